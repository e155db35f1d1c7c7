"""The files Ollama reads beside a GGUF: ``template`` (Go), ``params`` (JSON), ``system``, ``Modelfile``.

Models ramble in Ollama when these are wrong: a chat model needs its turn markers and an
end-of-turn stop, a completion model needs the plain prompt and EOS. A Jinja chat template
cannot be translated to Go in general, so rawtune *measures* it instead: it renders the Jinja
template on probe conversations, reads off the text each role is wrapped in (plus the
generation prompt and any default system prompt the template injects), builds a Go template
from those pieces, and checks on more conversations that both render the same text. A template
that is not of this "wrapped turns" shape (date-dependent, tool-calling logic, ...) is reported
and the model gets the completion template.
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

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """What the Go template renders (Python mirror of :func:`to_go_template`)."""
        out = [self.head]
        if self.default_system is not None and messages and messages[0]["role"] != "system":
            out.append(self.prefix["system"] + self.default_system + self.suffix["system"])
        for m in messages:
            if m["role"] in self.prefix:
                out.append(self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]])
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


def derive_format(render: Renderer, bos_token: Optional[str] = None, add_bos: bool = False) -> ChatFormat:
    """Measure a Jinja chat template (through ``render``) as a :class:`ChatFormat`."""
    u1, a1, u2, s1 = ({"role": "user", "content": _U1}, {"role": "assistant", "content": _A1},
                      {"role": "user", "content": _U2}, {"role": "system", "content": _S1})
    one = _render(render, [u1], False)
    one_gen = _render(render, [u1], True)
    if not one_gen.startswith(one):
        raise TemplateUnsupported("the generation prompt is not appended at the end of the conversation")
    generation = one_gen[len(one):]
    r0, suf_user = _between(one, [_U1])
    *_, suf_asst = _between(_render(render, [u1, a1], False), [_U1, _A1])
    _, p1, p2, p3 = _between(_render(render, [u1, a1, u2], False), [_U1, _A1, _U2])
    q0, q1, _ = _between(_render(render, [s1, u1], False), [_S1, _U1])
    if p3 != suf_user or not p1.startswith(suf_user) or not p2.startswith(suf_asst):
        raise TemplateUnsupported("the text after a message depends on what follows it")
    pre_asst = p1[len(suf_user):]
    pre_user = p2[len(suf_asst):]
    if not q1.endswith(pre_user):
        raise TemplateUnsupported("a user turn after a system message is wrapped differently")
    suf_sys = q1[:len(q1) - len(pre_user)]
    default_system = None
    if r0.endswith(pre_user) and q0.startswith(r0[:len(r0) - len(pre_user)]):
        head = r0[:len(r0) - len(pre_user)]
        pre_sys = q0[len(head):]
    elif r0.startswith(q0) and r0.endswith(suf_sys + pre_user):
        # The template writes a default system message when the conversation has none.
        head, pre_sys = "", q0
        default_system = r0[len(q0):len(r0) - len(suf_sys + pre_user)]
    else:
        raise TemplateUnsupported("the start of the conversation could not be matched to a system/user turn")
    if add_bos and bos_token and head.startswith(bos_token):
        head = head[len(bos_token):]  # llama.cpp/Ollama add BOS themselves for this model
    padded = _render(render, [{"role": "user", "content": f"  {_U1}  "}], False)
    trims = f"  {_U1}  " not in padded
    return ChatFormat(head, {"system": pre_sys, "user": pre_user, "assistant": pre_asst},
                      {"system": suf_sys, "user": suf_user, "assistant": suf_asst}, generation,
                      default_system, trims)


def check_format(fmt: ChatFormat, render: Renderer, bos_token: Optional[str] = None, add_bos: bool = False) -> None:
    """Compare the derived format with the Jinja template on conversations it was not derived from."""
    for messages, gen in sample_conversations(strip=fmt.trims_content):
        want = _render(render, messages, gen)
        if add_bos and bos_token and want.startswith(bos_token) and not fmt.head.startswith(bos_token):
            want = want[len(bos_token):]
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
    """
    parts = [_go_text(fmt.head)]
    if fmt.default_system is not None:
        parts.append('{{ if .Messages }}{{ if ne (index .Messages 0).Role "system" }}'
                     + _go_text(fmt.prefix["system"] + fmt.default_system + fmt.suffix["system"])
                     + "{{ end }}{{ end }}")
    parts.append("{{ range $i, $m := .Messages }}")
    for k, role in enumerate(ROLES):
        keyword = "if" if k == 0 else "else if"
        parts.append(f'{{{{ {keyword} eq $m.Role "{role}" }}}}' + _go_text(fmt.prefix[role])
                     + "{{ $m.Content }}" + _go_text(fmt.suffix[role]))
    parts.append("{{ end }}")  # closes the if/else-if chain
    # $last: the range index of the final message; Ollama always generates after the prompt.
    parts.append('{{ if eq (len (slice $.Messages $i)) 1 }}{{ if ne $m.Role "assistant" }}'
                 + _go_text(fmt.generation) + "{{ end }}{{ end }}")
    parts.append("{{ end }}")  # closes range
    return "".join(parts)


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
        fmt = derive_format(render, bos, add_bos)
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
