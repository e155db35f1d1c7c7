"""Running a rawtune run on Hugging Face Jobs, for when a Space (or this machine) is too small.

The run travels as its flat YAML settings in one environment variable of the job spec
(``RAWTUNE_JOB_CONFIG``); the job's command writes it to a file and runs ``rawtune run --config``
on it inside the image of the user's rawtune Space, which has rawtune and its requirements. The
user's token travels only as the job's ``HF_TOKEN`` *secret*: never in the command, the
environment, the logs or the run record. What the job cannot reach is refused before anything is
submitted: a local dataset or model (the job runs elsewhere) and a run that does not push (its disk
is gone when it ends).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from .errors import ConfigError, HubError
from .hubauth import LOGIN_HINT, endpoint, http_status, hub_error, is_repo_id, safe_text
from .rundir import scrub
from .settings import SECTIONS, RunSettings, to_dict

CONFIG_VAR = "RAWTUNE_JOB_CONFIG"  # the job's environment variable holding the run's YAML
CONFIG_FILE = "rawtune-job.yaml"  # written by the job's command in its working folder
# The job's command: write the YAML, then run it (unbuffered, so the logs arrive line by line).
COMMAND = ["sh", "-c", f'printf "%s\\n" "${CONFIG_VAR}" > {CONFIG_FILE} && exec python -u -m rawtune run '
                       f"--config {CONFIG_FILE}"]
SPACE_PREFIX = "hf.co/spaces/"
ENDED = ("COMPLETED", "CANCELED", "ERROR", "DELETED")
# Used only where huggingface_hub is too old to list the flavors itself.
KNOWN_FLAVORS = ("cpu-basic", "cpu-upgrade", "t4-small", "t4-medium", "l4x1", "l4x4", "a10g-small", "a10g-large",
                 "a10g-largex2", "a10g-largex4", "a100-large", "h200")
JOBS_TOKEN_HINT = ("a token that may start jobs (a fine-grained token with the Jobs permission, or a write token); "
                   + LOGIN_HINT)


def flavors() -> list[str]:
    """The hardware flavors HF Jobs offers, as huggingface_hub lists them."""
    try:
        from huggingface_hub import JobHardware
    except ImportError:
        return list(KNOWN_FLAVORS)
    return [h.value for h in JobHardware]


def check_flavor(flavor: str) -> str:
    if flavor not in flavors():
        raise ConfigError(f"--on-hf-jobs {flavor}: not an HF Jobs flavor; use one of {', '.join(flavors())}")
    return flavor


def default_image() -> Optional[str]:
    """This Space's image when running on a Space (``SPACE_ID``), else None."""
    space_id = os.environ.get("SPACE_ID")
    return SPACE_PREFIX + space_id if space_id else None


def image_for(image: Optional[str]) -> str:
    """The job's image: the given Space (``user/space`` or ``hf.co/spaces/user/space``), else this
    Space when running on one (``SPACE_ID``); off a Space it must be given."""
    image = (image or "").strip() or default_image() or ""
    if not image:
        raise ConfigError("--hf-jobs-image: give your rawtune Space, e.g. --hf-jobs-image hf.co/spaces/you/rawtune "
                          "(its image has rawtune installed; only on a Space is that Space the default)")
    if is_repo_id(image):
        return SPACE_PREFIX + image
    return image


def _local(spec: Optional[str]) -> bool:
    return bool(spec) and (Path(str(spec)).expanduser().exists() or not is_repo_id(spec))


def job_config(values: dict[str, Any], settings: RunSettings) -> str:
    """The YAML the job runs: the user's keys (config and flags), with the run directory made
    relative to the job's working folder. ``settings`` is the same run, resolved, for the checks."""
    dataset, model = settings.data.dataset, settings.train.model
    if not dataset or _local(dataset):
        raise ConfigError(f"--on-hf-jobs: the dataset {dataset!r} is not on the Hub, so the job cannot read it; "
                          "push the data to the Hub first (`hf upload --repo-type dataset you/name FILES`) or use a "
                          "Hub dataset id")
    if _local(model):
        raise ConfigError(f"--on-hf-jobs: the model {model!r} is a local path the job cannot reach; upload it to "
                          "the Hub first or give a Hub model id")
    if not settings.push.repo:
        raise ConfigError("--on-hf-jobs: give --repo user/name: the job's disk is gone when it ends, so the run "
                          "must push its GGUFs to the Hub")
    if settings.stages and "push" not in settings.stages:
        raise ConfigError("--on-hf-jobs: the stages must end with push (the job's disk is gone when it ends)")
    if settings.train.resume:
        raise ConfigError("--on-hf-jobs: a job starts on an empty disk and cannot resume a local run; drop --resume")
    values = {k: v for k, v in values.items() if k != "resume"}
    values["out"] = f"runs/{Path(str(values['out'])).name}" if values.get("out") else "runs/job"
    return yaml.safe_dump(values, sort_keys=True)


def flat_values(settings: RunSettings) -> dict[str, Any]:
    """Settings as the flat YAML keys ``rawtune run --config`` reads (the app's run, for a job)."""
    values: dict[str, Any] = {}
    for key, value in to_dict(settings).items():
        values.update(value if key in SECTIONS else {key: value})
    return {k: v for k, v in values.items() if v is not None}


def _api() -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint())


def submit(config: str, flavor: str, image: str, token: str, timeout: Optional[str] = None) -> Any:
    """Start the job; its ``JobInfo``. The token is the job's secret and the caller's credential."""
    from huggingface_hub.errors import HfHubHTTPError

    if not token:
        raise ConfigError(f"--on-hf-jobs needs {JOBS_TOKEN_HINT}")
    try:
        return _api().run_job(image=image, command=COMMAND, env={CONFIG_VAR: config, "PYTHONUNBUFFERED": "1"},
                              secrets={"HF_TOKEN": token}, flavor=check_flavor(flavor), timeout=timeout,
                              labels={"app": "rawtune"}, token=token)
    except HfHubHTTPError as exc:
        if http_status(exc) in (401, 403):  # a read token, or an app's sign-in without the jobs scope
            raise HubError(f"the Hub refused the token for HF Jobs ({safe_text(exc)}); use {JOBS_TOKEN_HINT}") \
                from None
        raise hub_error(exc, "starting the HF Job", "check the flavor, the image and your Jobs billing") from None


def follow(job: Any, token: str, log: Callable[[str], None], stop: Optional[threading.Event] = None) -> Any:
    """Stream the job's log lines to ``log`` until it ends; cancel it when ``stop`` is set (or on
    Ctrl-C, which huggingface_hub's log stream swallows: the CLI sets ``stop`` first). Its final
    ``JobInfo``."""
    api, stop = _api(), stop or threading.Event()
    ids = dict(job_id=job.id, namespace=job.owner.name, token=token)
    try:
        for line in api.fetch_job_logs(follow=True, **ids):
            log(scrub(line))
            if stop.is_set():
                break
    except KeyboardInterrupt:
        stop.set()
    if stop.is_set():
        api.cancel_job(**ids)
        log(f"rawtune: cancelled the HF Job {job.id}")
    info = api.inspect_job(**ids)
    deadline = time.monotonic() + 60  # the log stream may close a moment before the stage changes
    while info.status.stage not in ENDED and time.monotonic() < deadline:
        time.sleep(1)
        info = api.inspect_job(**ids)
    return info


def run_on_jobs(config: str, repo: str, flavor: str, image: str, token: str, log: Callable[[str], None] = print,
                stop: Optional[threading.Event] = None) -> Optional[str]:
    """Submit the run, follow its logs and return the URL of the pushed repo (None when ``stop``
    cancelled it); a job that did not complete raises with its stage and where its logs are."""
    job = submit(config, flavor, image, token)
    log(f"rawtune: HF Job {job.id} started on {flavor} ({job.url})")
    stop = stop or threading.Event()
    info = follow(job, token, log, stop)
    if stop.is_set():
        return None
    if info.status.stage != "COMPLETED":
        reason = f": {scrub(info.status.message)}" if info.status.message else ""
        raise HubError(f"the HF Job {job.id} ended {info.status.stage}{reason}; its logs: {job.url}")
    return f"{endpoint()}/{repo}"
