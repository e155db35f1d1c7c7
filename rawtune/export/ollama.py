"""The files Ollama reads beside a GGUF: ``template`` (Go), ``params`` (JSON), ``system``, ``Modelfile``.

Models ramble in Ollama when these are wrong: a chat model needs its turn markers and an
end-of-turn stop, a completion model needs the plain prompt and EOS. A Jinja chat template
cannot be translated to Go in general, so rawtune *measures* it instead: it renders the Jinja
template on probe conversations, reads off the text each role is wrapped in (plus the
generation prompt and any default system prompt the template injects), builds a Go template
from those pieces, and checks on more conversations that both render the same text. A template
that is not of this "wrapped turns" shape (tool-calling logic, ...) is reported and the model
gets the completion template.

Family shapes the measurement covers beyond plain ChatML: a system prompt folded into the first
user turn (Gemma 3); a template that refuses system messages (Gemma 2), whose system prompt
rawtune folds the same way, checked against the template with that text put in the first user
message; EOS written when no generation prompt follows (Phi-3/Phi-4-mini), which Ollama never
wants after a prompt and is left out; a final assistant turn wrapped differently from earlier
ones (Qwen3's empty ``<think>`` block, OLMo 2's EOS without newline). Qwen3's thinking is
simplified, not translated: the Go template writes assistant contents as given, where the Jinja
template drops ``<think>...</think>`` from earlier turns. Templates that print today's date
(Llama 3.x, Granite 3.x, SmolLM3) are measured on the day of the export, so the Go template and
``system`` file carry that date.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import ExportError

Message = dict[str, str]
Renderer = Callable[[list[Message], bool], str]  # (messages, add_generation_prompt) -> text

ROLES = ("system", "user", "assistant")
COMPLETION_TEMPLATE = "{{ .Prompt }}"
# Sampling defaults for small models: a little repetition penalty keeps them from looping.
SAMPLING = {"temperature": 0.7, "top_p": 0.9, "repeat_penalty": 1.1}
MAX_NUM_CTX = 4096
# Every file write_files may leave beside the GGUFs (the Hub push takes those that exist).
FILES = ("template", "params", "system", "Modelfile", "Modelfile.completion")
# Probe contents: plain ASCII words so templates that trim or escape content leave them intact.
_U1, _U2, _A1, _S1 = "rtprobeuserone", "rtprobeusertwo", "rtprobeassistantone", "rtprobesystemone"
# Between a folded system prompt and the user's text: what Gemma 3's template writes.
FOLD_SEPARATOR = "\n\n"


class TemplateUnsupported(ExportError):
    """The chat template is not a plain 'wrapped turns' template rawtune can translate to Go."""


@dataclass
class ChatFormat:
    """A chat template reduced to the text around each turn."""

    head: str  # once, at the start (e.g. BOS when the template writes it)
    prefix: dict[str, str]  # role -> text before the content
    suffix: dict[str, str]  # role -> text after the content
    generation: str  # after the last message when it is not the assistant's
    default_system: Optional[str] = None  # injected when the first message is not a system message
    trims_content: bool = False  # Jinja strips each message (| trim); Go's text/template has no trim
    last_assistant: Optional[tuple[str, str]] = None  # (prefix, suffix) of a final assistant turn, when different
    fold_system: Optional[str] = None  # system text opens the next user turn, followed by this separator
    system_refused: bool = False  # the Jinja template raises on system messages (rawtune folds them)
    closing: str = ""  # what Jinja appends without a generation prompt (Phi's EOS); never rendered

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """What the Go template renders (Python mirror of :func:`to_go_template`)."""
        out = [self.head]
        if self.default_system is not None and messages and messages[0]["role"] != "system":
            out.append(self.prefix["system"] + self.default_system + self.suffix["system"])
        folded = False
        for i, m in enumerate(messages):
            role = m["role"]
            if role not in self.prefix:
                continue
            pre, suf = self.prefix[role], self.suffix[role]
            if role == "assistant" and i == len(messages) - 1 and self.last_assistant:
                pre, suf = self.last_assistant
            if role == "user" and folded:
                pre = ""
            folded = role == "system" and self.fold_system is not None
            out.append(pre + m["content"] + suf)
        if add_generation_prompt and messages and messages[-1]["role"] != "assistant":
            out.append(self.generation)
        return "".join(out)


def _between(text: str, markers: list[str]) -> list[str]:
    """Split ``text`` at each marker in order; fails when a marker is missing or repeated."""
    parts, rest = [], text
    for marker in markers:
        if rest.count(marker) != 1:
            raise TemplateUnsupported(f"the chat template does not render each message's content exactly once "
                                      f"(probe {marker!r} seen {rest.count(marker)} times)")
        before, rest = rest.split(marker)
        parts.append(before)
    parts.append(rest)
    return parts


def _render(render: Renderer, messages: list[Message], gen: bool) -> str:
    try:
        return render(messages, gen)
    except Exception as exc:  # Jinja templates raise their own errors (raise_exception, undefined...)
        raise TemplateUnsupported(f"the chat template failed on a probe conversation: {type(exc).__name__}: {exc}") from None


def _closing(one: str, one_gen: str, eos_token: Optional[str]) -> str:
    """Text Jinja appends only when no generation prompt follows (Phi's EOS), else ""."""
    if one_gen.startswith(one):
        return ""
    if eos_token and one.endswith(eos_token) and one_gen.startswith(one[:len(one) - len(eos_token)]):
        return eos_token
    raise TemplateUnsupported("the generation prompt is not appended at the end of the conversation")


def _without_closing(render: Renderer, closing: str) -> Callable[[list[Message], bool], str]:
    def run(messages: list[Message], gen: bool) -> str:
        text = _render(render, messages, gen)
        if gen or not closing:
            return text
        if not text.endswith(closing):
            raise TemplateUnsupported(f"the template ends conversations with {closing!r} only sometimes")
        return text[:len(text) - len(closing)]
    return run


def _after_assistant(p2: str, suf_last: str, r0: str, bos_token: Optional[str]) -> tuple[str, str]:
    """Split the text between an assistant turn and the next user turn into (assistant suffix, user prefix).

    First try: the suffix is the one a final assistant turn gets. Else (OLMo 2 adds a newline only
    when more follows) the user prefix is the start of a one-message conversation without BOS.
    """
    candidates = []
    if p2.startswith(suf_last):
        candidates.append((suf_last, p2[len(suf_last):]))
    for head in filter(lambda h: h is not None, (bos_token, "")):
        pre = r0[len(head):] if r0.startswith(head) else None
        if pre and p2.endswith(pre):
            candidates.append((p2[:len(p2) - len(pre)], pre))
    for suf, pre in candidates:
        if r0.endswith(pre):
            return suf, pre
    raise TemplateUnsupported("the text between an assistant turn and the next user turn could not be split")


def _system_parts(render: Callable, r0: str, pre_user: str, bos_token: Optional[str]) -> dict[str, Any]:
    """How a leading system message is written: its own turn, a default one, or folded into the user turn."""
    s1, u1 = {"role": "system", "content": _S1}, {"role": "user", "content": _U1}
    try:
        text = render([s1, u1], False)
    except TemplateUnsupported:
        # Gemma 2 raises on any system message; fold it into the first user turn as Gemma 3 does.
        head = r0[:len(r0) - len(pre_user)]
        return dict(head=head, pre_sys=pre_user, suf_sys=FOLD_SEPARATOR, fold=FOLD_SEPARATOR, refused=True)
    q0, q1, _ = _between(text, [_S1, _U1])
    if not q1.endswith(pre_user):
        if q0 == r0:  # the system text sits where the first user's text would, then the user's text
            return dict(head=r0[:len(r0) - len(pre_user)], pre_sys=pre_user, suf_sys=q1, fold=q1)
        raise TemplateUnsupported("a user turn after a system message is wrapped differently")
    suf_sys = q1[:len(q1) - len(pre_user)]
    if r0.endswith(pre_user) and q0.startswith(r0[:len(r0) - len(pre_user)]):
        head = r0[:len(r0) - len(pre_user)]
        return dict(head=head, pre_sys=q0[len(head):], suf_sys=suf_sys)
    if r0.startswith(q0) and r0.endswith(suf_sys + pre_user):
        # The template writes a default system message when the conversation has none.
        # BOS is a head of its own only when it is not the start of every turn (SmolLM2's BOS is <|im_start|>).
        own_bos = bos_token and q0.startswith(bos_token) and not pre_user.startswith(bos_token)
        head = bos_token if own_bos else ""
        return dict(head=head, pre_sys=q0[len(head):], suf_sys=suf_sys,
                    default=r0[len(q0):len(r0) - len(suf_sys + pre_user)])
    raise TemplateUnsupported("the start of the conversation could not be matched to a system/user turn")


def derive_format(render: Renderer, bos_token: Optional[str] = None, add_bos: bool = False,
                  eos_token: Optional[str] = None) -> ChatFormat:
    """Measure a Jinja chat template (through ``render``) as a :class:`ChatFormat`."""
    u1, a1, u2 = ({"role": "user", "content": _U1}, {"role": "assistant", "content": _A1},
                  {"role": "user", "content": _U2})
    one, one_gen = _render(render, [u1], False), _render(render, [u1], True)
    closing = _closing(one, one_gen, eos_token)
    r = _without_closing(render, closing)
    one = one[:len(one) - len(closing)]
    generation = one_gen[len(one):]
    r0, suf_user = _between(one, [_U1])
    _, x1, suf_last = _between(r([u1, a1], False), [_U1, _A1])
    _, p1, p2, p3 = _between(r([u1, a1, u2], False), [_U1, _A1, _U2])
    if p3 != suf_user or not p1.startswith(suf_user) or not x1.startswith(suf_user):
        raise TemplateUnsupported("the text after a message depends on what follows it")
    pre_asst, pre_last = p1[len(suf_user):], x1[len(suf_user):]
    suf_asst, pre_user = _after_assistant(p2, suf_last, r0, bos_token)
    sp = _system_parts(r, r0, pre_user, bos_token)
    head = sp["head"]
    if add_bos and bos_token and head.startswith(bos_token):
        head = head[len(bos_token):]  # llama.cpp/Ollama add BOS themselves for this model
    padded = _render(render, [{"role": "user", "content": f"  {_U1}  "}], False)
    last = (pre_last, suf_last) if (pre_last, suf_last) != (pre_asst, suf_asst) else None
    return ChatFormat(head, {"system": sp["pre_sys"], "user": pre_user, "assistant": pre_asst},
                      {"system": sp["suf_sys"], "user": suf_user, "assistant": suf_asst}, generation,
                      sp.get("default"), f"  {_U1}  " not in padded, last, sp.get("fold"),
                      sp.get("refused", False), closing)


def _reference(fmt: ChatFormat, messages: list[Message]) -> list[Message]:
    """The conversation the Jinja template is compared on: for a template that refuses system
    messages, the system text put at the head of the first user message (what rawtune renders)."""
    if not (fmt.system_refused and len(messages) > 1 and messages[0]["role"] == "system"
            and messages[1]["role"] == "user"):
        return messages
    merged = {"role": "user", "content": messages[0]["content"] + fmt.fold_system + messages[1]["content"]}
    return [merged] + messages[2:]


def reference_render(fmt: ChatFormat, render: Renderer, messages: list[Message], gen: bool,
                     bos_token: Optional[str] = None, add_bos: bool = False) -> str:
    """What the Jinja template renders for ``messages``, as the Go template must reproduce it."""
    want = _render(render, _reference(fmt, messages), gen)
    if not gen and fmt.closing and want.endswith(fmt.closing):
        want = want[:len(want) - len(fmt.closing)]
    if add_bos and bos_token and want.startswith(bos_token) and not fmt.head.startswith(bos_token):
        want = want[len(bos_token):]
    return want


def check_format(fmt: ChatFormat, render: Renderer, bos_token: Optional[str] = None, add_bos: bool = False) -> None:
    """Compare the derived format with the Jinja template on conversations it was not derived from."""
    for messages, gen in sample_conversations(strip=fmt.trims_content):
        want = reference_render(fmt, render, messages, gen, bos_token, add_bos)
        got = fmt.render(messages, gen)
        if got != want:
            raise TemplateUnsupported(f"the translated template renders {got[:120]!r} where the chat template "
                                      f"renders {want[:120]!r}")


def sample_conversations(strip: bool = False) -> list[tuple[list[Message], bool]]:
    """Conversations used to check a translation (and by the tests against Go's text/template).

    ``strip``: without surrounding whitespace in the contents, for templates that trim them.
    """
    sys_ = {"role": "system", "content": "You answer briefly."}
    conversations = [
        ([{"role": "user", "content": "Hello!"}], True),
        ([sys_, {"role": "user", "content": "What is 2+2?\nExplain."}], True),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"},
          {"role": "user", "content": "Tell me a \"joke\" about {braces} & <tags>."}], True),
        ([sys_, {"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"}], False),
        ([sys_, {"role": "user", "content": "Ünïcödé ✓ text"}, {"role": "assistant", "content": "ok"},
          {"role": "user", "content": "  spaced  "}], True),
    ]
    if strip:
        conversations = [([{**m, "content": m["content"].strip()} for m in ms], gen) for ms, gen in conversations]
    return conversations


# ---------------------------------------------------------------- Go templates


def _go_text(text: str) -> str:
    """Literal text inside a Go template; quoted only when it contains template delimiters."""
    if "{{" in text or "}}" in text:
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"
    return text


def to_go_template(fmt: ChatFormat) -> str:
    """The Go ``text/template`` Ollama runs, rendering exactly what :meth:`ChatFormat.render` does.

    No trim markers are used: every newline in the output is one of the template's own.
    ``$last`` marks the final message; ``$folded`` (only for folded system prompts) says that the
    previous message was a system prompt written at the head of this user turn.
    """
    fold = fmt.fold_system is not None
    parts = [_go_text(fmt.head)]
    if fmt.default_system is not None:
        parts.append('{{ if .Messages }}{{ if ne (index .Messages 0).Role "system" }}'
                     + _go_text(fmt.prefix["system"] + fmt.default_system + fmt.suffix["system"])
                     + "{{ end }}{{ end }}")
    if fold:
        parts.append("{{ $folded := false }}")
    parts.append("{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}")
    parts.append('{{ if eq $m.Role "system" }}' + _turn(fmt, "system") + ("{{ $folded = true }}" if fold else ""))
    user = _turn(fmt, "user")
    if fold:
        user = ("{{ if $folded }}{{ $m.Content }}" + _go_text(fmt.suffix["user"]) + "{{ else }}" + user
                + "{{ end }}{{ $folded = false }}")
    parts.append('{{ else if eq $m.Role "user" }}' + user)
    assistant = _turn(fmt, "assistant")
    if fmt.last_assistant:
        pre, suf = fmt.last_assistant
        assistant = ("{{ if $last }}" + _go_text(pre) + "{{ $m.Content }}" + _go_text(suf)
                     + "{{ else }}" + assistant + "{{ end }}")
    parts.append('{{ else if eq $m.Role "assistant" }}' + assistant + ("{{ $folded = false }}" if fold else ""))
    parts.append("{{ end }}")  # closes the if/else-if chain
    # Ollama always generates after the prompt: the generation prompt follows a final non-assistant turn.
    parts.append('{{ if $last }}{{ if ne $m.Role "assistant" }}' + _go_text(fmt.generation) + "{{ end }}{{ end }}")
    parts.append("{{ end }}")  # closes range
    return "".join(parts)


def _turn(fmt: ChatFormat, role: str) -> str:
    return _go_text(fmt.prefix[role]) + "{{ $m.Content }}" + _go_text(fmt.suffix[role])


def stop_strings(fmt: Optional[ChatFormat], eos_token: Optional[str], special_tokens: list[str]) -> list[str]:
    """Stops: EOS, and the special tokens that end an assistant turn or start the next one."""
    stops: list[str] = []
    if fmt is not None:
        for text in (fmt.suffix["assistant"], fmt.prefix["user"], fmt.prefix["assistant"]):
            found = sorted((text.find(t), t) for t in special_tokens if t and t in text)
            if found:
                stops.append(found[0][1])
    if eos_token:
        stops.append(eos_token)
    return list(dict.fromkeys(s for s in stops if s.strip()))


# ---------------------------------------------------------------- the files


def tokenizer_renderer(tokenizer: Any) -> Renderer:
    """A renderer that runs the HF tokenizer's Jinja chat template."""
    def render(messages: list[Message], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return render


def chat_format_for(tokenizer: Any, add_bos: bool, log: Callable[[str], None] = print) -> Optional[ChatFormat]:
    """The tokenizer's chat template as a checked :class:`ChatFormat`, or None (completion model)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    render = tokenizer_renderer(tokenizer)
    bos = tokenizer.bos_token
    try:
        fmt = derive_format(render, bos, add_bos, tokenizer.eos_token)
        check_format(fmt, render, bos, add_bos)
    except TemplateUnsupported as exc:
        log(f"[export] WARNING: the chat template cannot be translated for Ollama ({exc}); "
            f"writing the completion template instead")
        return None
    if fmt.trims_content:
        log("[export] note: the chat template trims each message; Ollama's Go template cannot, so "
            "messages with leading or trailing spaces keep them in Ollama")
    return fmt


def modelfile(gguf_name: str, template: str, params: dict[str, Any], system: Optional[str]) -> str:
    """A Modelfile for ``ollama create NAME -f Modelfile`` in the export folder."""
    for text in filter(None, (template, system)):
        if '"""' in text:
            raise ExportError('the template or system prompt contains """, which a Modelfile cannot quote')
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for key, value in params.items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"PARAMETER {key} {json.dumps(item, ensure_ascii=False) if isinstance(item, str) else item}")
    return "\n".join(lines) + "\n"


def write_files(out_dir: Path, gguf_name: str, fmt: Optional[ChatFormat], eos_token: Optional[str],
                special_tokens: list[str], context_length: int) -> dict[str, Any]:
    """Write ``template``, ``params``, ``system`` (when any) and ``Modelfile``; return what was written."""
    out_dir = Path(out_dir)
    template = to_go_template(fmt) if fmt else COMPLETION_TEMPLATE
    stops = stop_strings(fmt, eos_token, special_tokens)
    params: dict[str, Any] = {"stop": stops, "num_ctx": int(min(context_length, MAX_NUM_CTX)), **SAMPLING}
    system = fmt.default_system if fmt else None
    (out_dir / "template").write_text(template, encoding="utf-8")
    (out_dir / "params").write_text(json.dumps(params, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    system_file = out_dir / "system"
    if system:
        system_file.write_text(system, encoding="utf-8")
    elif system_file.exists():
        system_file.unlink()  # left over from an earlier export with another template
    (out_dir / "Modelfile").write_text(modelfile(gguf_name, template, params, system), encoding="utf-8")
    files = ["template", "params", "Modelfile"] + (["system"] if system else [])
    if fmt is not None:
        # A raw-text tune is also a completion model: offer that variant for local `ollama create`.
        plain = {**params, "stop": stop_strings(None, eos_token, special_tokens)}
        (out_dir / "Modelfile.completion").write_text(modelfile(gguf_name, COMPLETION_TEMPLATE, plain, None),
                                                      encoding="utf-8")
        files.append("Modelfile.completion")
    elif (out_dir / "Modelfile.completion").exists():
        (out_dir / "Modelfile.completion").unlink()
    return {"template": "chat" if fmt else "completion", "stop": stops, "files": files, "params": params}
