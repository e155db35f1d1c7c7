"""Publishing a run: the model card (:mod:`.card`, pure) and the push to the Hub (:mod:`.push`)."""
