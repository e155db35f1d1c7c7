"""The Ollama files: Jinja chat templates translated to Go and checked with Go's own text/template.

The Go side runs a small program with ``go run`` (Debian's golang-go), fed the template and the
conversations as JSON, with the same variables Ollama passes (Messages, System, Prompt,
Response). Rendering in Python alone would only test rawtune against itself.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import jinja2
import pytest
from transformers import AutoTokenizer

from rawtune.export import ollama
from rawtune.errors import ExportError

GO_PROGRAM = r"""
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

type Case struct {
	Messages []Message
	Prompt   string
	System   string
}

func main() {
	var in struct {
		Template string
		Cases    []Case
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("t").Parse(in.Template))
	out := []string{}
	for _, c := range in.Cases {
		var b strings.Builder
		data := map[string]any{"Messages": c.Messages, "Prompt": c.Prompt, "System": c.System, "Response": ""}
		if err := tmpl.Execute(&b, data); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""

# SmolLM2-Instruct's template: writes a default system message when the conversation has none.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama 3's shape: BOS once, header tokens, trimmed content.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Renders every message twice: not a wrapped-turns template.
ODD_TEMPLATE = "{% for m in messages %}{{ m['content'] }}|{{ m['content'] }}{% endfor %}"


def jinja_renderer(source: str, bos_token: str = "") -> ollama.Renderer:
    """A plain Jinja renderer with transformers' whitespace settings, for templates not on a tokenizer."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(source)

    def render(messages, add_generation_prompt):
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token)
    return render


_GO_BINARY: list[Path] = []


def go_binary() -> Path:
    """Build the Go renderer once per session (``go build``; about a second with a warm cache)."""
    if _GO_BINARY:
        return _GO_BINARY[0]
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (apt-get install -y golang-go); it is needed to run text/template")
    work = Path(tempfile.mkdtemp(prefix="rawtune-go-"))
    (work / "main.go").write_text(GO_PROGRAM)
    proc = subprocess.run([go, "build", "-o", str(work / "render"), str(work / "main.go")],
                          capture_output=True, text=True, timeout=300, cwd=work)
    assert proc.returncode == 0, proc.stderr
    _GO_BINARY.append(work / "render")
    return _GO_BINARY[0]


def go_render(template: str, cases: list[dict]) -> list[str]:
    """Render ``template`` with Go's text/template for each case (Messages/Prompt/System)."""
    proc = subprocess.run([str(go_binary())], input=json.dumps({"Template": template, "Cases": cases}),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def assert_go_matches_jinja(render: ollama.Renderer, fmt: ollama.ChatFormat, strip_bos: str = "") -> list[str]:
    """Go's rendering of the sample conversations must equal the Jinja template's; returns Go's texts.

    The Jinja side is :func:`ollama.reference_render`: the template's own output, without the EOS
    some templates append when no generation prompt follows, and for templates that refuse system
    messages, with the system text at the head of the first user message.
    """
    conversations = ollama.sample_conversations(strip=fmt.trims_content)
    got = go_render(ollama.to_go_template(fmt), [{"Messages": m} for m, _ in conversations])
    compared = []
    for (messages, gen), go_text in zip(conversations, got):
        if not gen and messages[-1]["role"] != "assistant":
            continue  # Ollama always adds the generation prompt; Jinja without it is not comparable
        want = ollama.reference_render(fmt, render, messages, gen, strip_bos or None, add_bos=bool(strip_bos))
        assert go_text == want, (messages, go_text, want)
        compared.append(go_text)
    return compared


def test_tiny_chatml_renders_the_same_in_go(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    fmt = ollama.chat_format_for(tok, add_bos=False)
    assert fmt is not None and fmt.default_system is None and not fmt.trims_content
    assert fmt.prefix["user"] == "<|im_start|>user\n" and fmt.suffix["assistant"] == "<|im_end|>\n"
    assert_go_matches_jinja(ollama.tokenizer_renderer(tok), fmt)


def test_default_system_prompt_is_kept(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = SMOLLM2_TEMPLATE
    render = ollama.tokenizer_renderer(tok)
    fmt = ollama.chat_format_for(tok, add_bos=False)
    assert fmt.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert_go_matches_jinja(render, fmt)
    # Without a system message the Go template writes SmolLM's; with one, only the given one.
    out = go_render(ollama.to_go_template(fmt), [{"Messages": [{"role": "user", "content": "Hi"}]},
                                                 {"Messages": [{"role": "system", "content": "S"},
                                                               {"role": "user", "content": "Hi"}]}])
    assert out[0].startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert out[1].startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi")


def test_llama3_shape_with_bos_and_trim():
    render = jinja_renderer(LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>")
    fmt = ollama.derive_format(render, "<|begin_of_text|>", add_bos=False)
    ollama.check_format(fmt, render)
    assert fmt.head == "<|begin_of_text|>" and fmt.trims_content
    assert_go_matches_jinja(render, fmt)
    # When llama.cpp adds BOS itself, the template must not write a second one.
    fmt_bos = ollama.derive_format(render, "<|begin_of_text|>", add_bos=True)
    assert fmt_bos.head == ""
    ollama.check_format(fmt_bos, render, "<|begin_of_text|>", add_bos=True)
    assert_go_matches_jinja(render, fmt_bos, strip_bos="<|begin_of_text|>")
    stops = ollama.stop_strings(fmt, "<|end_of_text|>", ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"])
    assert stops[0] == "<|eot_id|>" and "<|end_of_text|>" in stops


def test_untranslatable_template_falls_back_to_completion(tiny_tokenizer_dir):
    with pytest.raises(ollama.TemplateUnsupported):
        ollama.derive_format(jinja_renderer(ODD_TEMPLATE))
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = ODD_TEMPLATE
    lines = []
    assert ollama.chat_format_for(tok, add_bos=False, log=lines.append) is None
    assert "completion template" in lines[0]


def test_completion_template_renders_the_prompt():
    prompt = "Once upon a time {{not a template}} \"quoted\"\nsecond line"
    out = go_render(ollama.COMPLETION_TEMPLATE, [{"Messages": [{"role": "user", "content": prompt}], "Prompt": prompt}])
    assert out == [prompt]


def test_template_text_with_braces_is_quoted():
    render = jinja_renderer("{% for m in messages %}{{ '{{' }}{{ m['role'] }}}}:{{ m['content'] }}\n{% endfor %}"
                            "{% if add_generation_prompt %}{{ '{{assistant}}:' }}{% endif %}")
    fmt = ollama.derive_format(render)
    ollama.check_format(fmt, render)
    assert_go_matches_jinja(render, fmt)


def test_write_files(tmp_path, tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = SMOLLM2_TEMPLATE
    fmt = ollama.chat_format_for(tok, add_bos=False)
    info = ollama.write_files(tmp_path, "m.Q4_K_M.gguf", fmt, "<|endoftext|>",
                              ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], context_length=8192)
    params = json.loads((tmp_path / "params").read_text())
    assert params["stop"] == ["<|im_end|>", "<|im_start|>", "<|endoftext|>"]
    assert params["num_ctx"] == 4096 and params["temperature"] > 0
    assert (tmp_path / "template").read_text() == ollama.to_go_template(fmt)
    assert (tmp_path / "system").read_text().startswith("You are a helpful AI assistant named SmolLM")
    modelfile = (tmp_path / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./m.Q4_K_M.gguf\nTEMPLATE \"\"\"")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "SYSTEM" in modelfile
    assert "{{ .Prompt }}" in (tmp_path / "Modelfile.completion").read_text()
    assert info["template"] == "chat" and "system" in info["files"]
    # A completion model: plain prompt, EOS stop, and no stale system file.
    info = ollama.write_files(tmp_path, "m.Q4_K_M.gguf", None, "<|endoftext|>", ["<|endoftext|>"], 512)
    assert (tmp_path / "template").read_text() == "{{ .Prompt }}"
    assert json.loads((tmp_path / "params").read_text())["stop"] == ["<|endoftext|>"]
    assert not (tmp_path / "system").exists() and info["template"] == "completion"


def test_modelfile_refuses_triple_quotes():
    with pytest.raises(ExportError):
        ollama.modelfile("m.gguf", 'x """ y', {}, None)
