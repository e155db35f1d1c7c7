"""The declaration types of the family registry: what one model family module declares.

A family module (``rawtune/families/<name>.py``) builds one :class:`Family` and names it
``FAMILY``; :mod:`rawtune.families` finds it. Every field below is a fact other modules used
to keep their own copy of: the export writer reads :class:`Gguf`, the training loops
:class:`Lora` and :class:`Training`, Compare and the Ollama files :class:`Template`, the app,
the time estimate and the memory planner :class:`KnownModel`. Hooks are plain functions
declared beside the family (the ``gguf`` package is imported inside them, never at import
time). :class:`Shape` and :func:`rope_settings` read config.json the one way all of them share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

# The layer kinds LoRA targets are declared for.
LAYER_KINDS = ("attention", "mlp", "linear_attention", "conv", "mamba", "experts")
# The projection names rawtune's settings and presets use (Llama's): requesting one of these on a
# family that names that kind of layer differently selects that family's modules of the kind.
GENERIC_TARGETS = {"attention": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
# gguf.MODEL_TENSOR names llama.cpp requires in every block of a Llama-shaped model.
LLAMA_BLOCKS = ("ATTN_NORM", "ATTN_Q", "ATTN_K", "ATTN_V", "ATTN_OUT", "FFN_NORM", "FFN_GATE", "FFN_UP", "FFN_DOWN")

Config = dict  # a parsed config.json

# Split regexes of the tokenizers library itself, which family pre-tokenizers are built from.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"  # ByteLevel(use_regex=True)
DIGIT_REGEX = r"\p{N}"  # Digits(individual_digits=True)
DIGITS_REGEX = r"\p{N}+"  # Digits(individual_digits=False)
# A plain ByteLevel tokenizer splits like GPT-2: llama.cpp's "gpt-2" pre-tokenizer.
BASE_PRE_TOKENIZERS = {(GPT2_REGEX,): "gpt-2"}


@dataclass(frozen=True)
class Shape:
    """The sizes every family shares, read once from config.json (:func:`read_shape`)."""

    n_layer: int
    n_head: int
    n_head_kv: int
    n_embd: int
    head_dim: int
    rope_dim: int  # rotated dimensions per head (partial rotary: fewer than head_dim)
    vocab_size: int
    tied: bool


def rope_settings(config: Config) -> dict[str, Any]:
    """RoPE parameters from either transformers 5 (``rope_parameters``) or 4 (``rope_theta``/``rope_scaling``)."""
    params = dict(config.get("rope_parameters") or {})
    if "full_attention" in params and isinstance(params["full_attention"], dict):
        params = dict(params["full_attention"])
    if "rope_theta" not in params and "rope_theta" in config:
        params["rope_theta"] = config["rope_theta"]
    scaling = config.get("rope_scaling") or {}
    for key, value in scaling.items():
        params.setdefault(key, value)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    return params


def read_shape(config: Config) -> Shape:
    """The :class:`Shape` of a config.json."""
    n_head = int(config["num_attention_heads"])
    n_embd = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or n_embd // n_head)
    partial = float(rope_settings(config).get("partial_rotary_factor") or config.get("partial_rotary_factor") or 1.0)
    return Shape(n_layer=int(config["num_hidden_layers"]), n_head=n_head,
                 n_head_kv=int(config.get("num_key_value_heads") or n_head), n_embd=n_embd, head_dim=head_dim,
                 rope_dim=int(head_dim * partial), vocab_size=int(config["vocab_size"]),
                 tied=bool(config.get("tie_word_embeddings", False)))


@dataclass(frozen=True)
class TensorOut:
    """One GGUF tensor made from one HF tensor, or from several (what a :attr:`Gguf.tensors` hook returns).

    With ``inputs`` (the other HF tensors it is made from), ``convert`` receives a dict
    ``{hf name: float32 array}`` holding the tensor the hook was asked about and every input; the
    writer keeps the inputs that arrive earlier until the last one is read, and writes the
    tensor at that point of the file. Return ``[]`` from the hook for the inputs themselves
    when they become no tensor of their own.
    """

    name: str  # full GGUF name, e.g. "blk.0.ffn_gate_exps.weight"
    shape: tuple[int, ...]  # the numpy shape of the array ``convert`` returns
    # float32 array (a dict with ``inputs``) -> array, in place of the standard transforms; None: the
    # standard transforms (Q/K permutation, norm offset, the family's transform hook)
    convert: Optional[Callable[[Any], Any]] = None
    f32: Optional[bool] = None  # stored as float32 (None: 1-D tensors are, others take the file's type)
    inputs: tuple[str, ...] = ()  # other HF tensor names this one is made from
    # Input columns reordered by ``convert``: GGUF column j is the HF tensor's column columns[j] (None:
    # same order). The importance matrix, measured on the HF model's inputs, is reordered to match.
    columns: Optional[Any] = None


@dataclass(frozen=True)
class Gguf:
    """How the family's HF checkpoints become a llama.cpp architecture (:mod:`rawtune.export.gguf_writer`).

    Tensor names come from the gguf package's map for :attr:`arch`; the hooks cover what the map
    and the common hyperparameters do not. Hook signatures (``config``: config.json, ``shape``:
    :class:`Shape`, ``writer``: a ``gguf.GGUFWriter``):

    - ``check(config, shape)``: raise :class:`rawtune.errors.ExportError` for a checkpoint llama.cpp
      would run differently (a feature the architecture cannot express);
    - ``hparams(writer, config, shape)``: the family's own keys, after the common ones;
    - ``transform(hf_name, data, shape)``: the family's weight change after the standard ones
      (Q/K permutation, norm offset), returning the new array (same shape);
    - ``tensors(hf_name, dims, config, shape)``: None for the default path (the name map), else
      the GGUF tensors this HF tensor becomes (``[]`` leaves it out): renames the map lacks,
      splits, reshapes;
    - ``extra_tensors(config, shape, rope_type)``: tensors llama.cpp reads that the checkpoint
      lacks (RoPE factors), ``{gguf name: float32 array}``;
    - ``required(config, shape)``: GGUF tensor names required beyond :attr:`blocks`/:attr:`bias`;
    - ``shape(config)``: the :class:`Shape` where :func:`read_shape` cannot read it (nested configs);

    ``skip_common`` names the common hyperparameters (``GGUFWriter.add_<name>`` methods, e.g.
    ``"feed_forward_length"``, ``"head_count_kv"``) the writer leaves to the family's ``hparams``
    hook (per-layer arrays, other config keys), since a key can be written only once.
    """

    arch: str  # gguf.MODEL_ARCH member name (lower case is llama.cpp's name)
    permute_qk: bool = False  # llama.cpp runs RoPE on interleaved pairs: permute Q/K rows per head
    norm_offset: float = 0.0  # HF RMSNorm multiplies by (1 + w): write w + 1
    blocks: tuple[str, ...] = LLAMA_BLOCKS  # gguf.MODEL_TENSOR names llama.cpp requires per block
    bias: tuple[str, ...] = ()  # per-block biases llama.cpp requires
    rope_types: tuple[str, ...] = ("default", "linear")
    hparams: Optional[Callable[[Any, Config, Shape], None]] = None
    check: Optional[Callable[[Config, Shape], None]] = None
    transform: Optional[Callable[[str, Any, Shape], Any]] = None
    tensors: Optional[Callable[[str, tuple[int, ...], Config, Shape], Optional[list[TensorOut]]]] = None
    extra_tensors: Optional[Callable[[Config, Shape, str], dict[str, Any]]] = None
    required: Optional[Callable[[Config, Shape], set[str]]] = None
    shape: Optional[Callable[[Config], Shape]] = None
    skip_common: tuple[str, ...] = ()

    @property
    def model_arch(self) -> Any:
        """The ``gguf.MODEL_ARCH`` member (imports gguf)."""
        import gguf

        return getattr(gguf.MODEL_ARCH, self.arch)

    @property
    def name(self) -> str:
        """llama.cpp's architecture name (the gguf package's spelling: ``granitehybrid``, ``gpt-oss``)."""
        import gguf

        return gguf.MODEL_ARCH_NAMES[self.model_arch]


@dataclass(frozen=True)
class TextStack:
    """A multimodal checkpoint of the family whose text model rawtune trains (Qwen3.5's Hub models are
    vision-language checkpoints): :func:`rawtune.models.resolve_model` writes the text model alone to a
    cached folder once, a plain checkpoint of ``architecture``, and every stage works on that."""

    wrappers: tuple[str, ...]  # config.json "architectures" of the multimodal checkpoints
    architecture: str  # the text model's HF class, written into the text folder's config
    prefix: str  # weight-name prefix of the text model inside the checkpoint (becomes "model.")
    dropped: tuple[str, ...]  # weight-name prefixes left out (vision tower, multi-token prediction)


@dataclass(frozen=True)
class Embeddings:
    """Embedding tying and where llama.cpp shares one matrix."""

    # llama.cpp reads one matrix for the input embedding and the output layer (no output.weight):
    # a separately trained lm_head could not be exported, so training keeps the embeddings frozen
    # and tied, and export refuses an untied checkpoint.
    shared: bool = False
    # llama.cpp's loader requires output.weight even for a tied checkpoint: export writes the
    # tied embedding as output.weight too.
    output_when_tied: bool = False


@dataclass(frozen=True)
class Lora:
    """LoRA targets by layer kind (:data:`LAYER_KINDS`), and fused projections.

    ``kinds``: kind -> this family's module names of that kind. A requested generic name
    (:data:`GENERIC_TARGETS`) the model lacks selects the family's modules of the same kind;
    ``fused``: a fused module -> the split names it stands for (asking for any of them selects
    it); ``presets``: preset -> the kinds beyond attention and MLP its default targets add
    (e.g. ``{"standard": ("mamba",)}``), with ``why`` saying where the choice comes from.
    ``targets`` (optional hook) replaces the whole mapping: ``(requested, module_names, preset)
    -> names``. ``parameters``: parameter names PEFT adapts directly (its ``target_parameters``,
    for weights that are not Linear modules, e.g. fused experts), per preset (key ``"*"``: all).
    """

    kinds: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(GENERIC_TARGETS))
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    presets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    why: str = ""
    targets: Optional[Callable[[list[str], set[str], Optional[str]], list[str]]] = None
    parameters: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Training:
    """What the training loops can do with the family."""

    fast_loop: bool = False  # rawtune's flattened fast-loop layer computes this family's layer exactly
    # (config, seq_len) -> why the fast loop's layer would differ for this checkpoint, or None
    fast_loop_check: Optional[Callable[[Config, int], Optional[str]]] = None
    unsloth: bool = True  # Unsloth supports the architecture
    unsloth_fails: str = ""  # why Unsloth's training fails (``auto`` then trains with PEFT); "" when it works

    @property
    def unsloth_trains(self) -> bool:
        """Whether a run loads this family with Unsloth (``auto`` picks PEFT otherwise)."""
        return self.unsloth and not self.unsloth_fails


@dataclass(frozen=True)
class Template:
    """Chat template facts: how rawtune's measured Ollama template and Compare treat the family."""

    end_of_turn: tuple[str, ...] = ()  # tokens that close an assistant turn, besides EOS
    thinking: str = ""  # how the template's thinking is handled ("" for none)
    system: str = "own turn"  # how a system message is written: own turn, or folded into the first user turn


@dataclass(frozen=True)
class Dims:
    """The config.json sizes the memory planner needs, for planning without a download."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool


@dataclass(frozen=True)
class KnownModel:
    """A Hub model of a family: what the app lists, the time estimate and the gated check need."""

    repo: str  # Hub id
    params: float  # parameter count from the model card (embeddings counted once when tied)
    gated: bool = False  # the repo serves files only to accounts that accepted its licence
    instruct: bool = False  # chat-tuned (has a chat template); else a base model
    dims: Optional[Dims] = None  # planner shape (``python -m rawtune.train.plan ID``)
    listed: bool = True  # offered in the app's model list (False: known to the planner only)
    family: str = ""  # filled in by the registry from the declaring family


@dataclass(frozen=True)
class Family:
    """Everything rawtune knows about one model family."""

    name: str  # rawtune's family name, the module's name (llama, qwen2, ...)
    label: str  # the models it covers, for messages and the README ("Qwen2, Qwen2.5")
    hf_architectures: tuple[str, ...]  # config.json "architectures" values
    model_types: tuple[str, ...]  # config.json "model_type" values
    order: int = 1000  # position in lists, messages and the README tables
    tokenizer: str = ""  # the tokenizers it ships, for the README
    gguf: Optional[Gguf] = None  # None: GGUF export refused
    embeddings: Embeddings = Embeddings()
    lora: Lora = Lora()
    training: Training = Training()
    template: Template = Template()
    models: tuple[KnownModel, ...] = ()
    gated_owners: tuple[str, ...] = ()  # Hub id prefixes whose repos of this family are all gated
    # Before training (and export): (config, vocabulary tokens) -> why llama.cpp could not run this
    # checkpoint, in one line, or None. For what must be refused before any training time is spent.
    refuse: Optional[Callable[[Config, frozenset], Optional[str]]] = None
    notes: str = ""  # one line for the README's family table (what is refused, etc.)
    text_stack: Optional[TextStack] = None  # multimodal checkpoints trained as their text model
