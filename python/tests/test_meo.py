"""The Python package against the `meo` command line on the same file: conversion, greedy and
seeded generation, streaming, chat, chat templates (transformers' renderings), eval, errors."""

import json
import os
import threading

import pytest

import meo
from conftest import FIXTURES, TEXT, run_cli

PROMPT = "The router scores"


def test_convert_writes_the_file_the_summary_describes(model_path, checkpoint, tmp_path, meo_bin):
    assert model_path.stat().st_size > 0
    # The same conversion from the command line gives the same bytes.
    cli = tmp_path / "cli.meo"
    run_cli(meo_bin, "convert", checkpoint, "-o", cli)
    assert cli.read_bytes() == model_path.read_bytes()
    s = meo.convert(checkpoint, tmp_path / "int4.meo", experts="int4", dense="int8")
    assert s.architecture == "mixtral"
    assert s.file_bytes == (tmp_path / "int4.meo").stat().st_size
    assert s.file_bytes < model_path.stat().st_size
    assert s.tensors > 0 and s.checkpoint_bytes > 0
    assert s.output == str(tmp_path / "int4.meo")


def test_convert_errors_name_the_problem(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        meo.convert(tmp_path / "no-such-dir", tmp_path / "x.meo")
    with pytest.raises(ValueError, match="int3"):
        meo.convert(checkpoint, tmp_path / "x.meo", experts="int3")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        meo.convert(checkpoint, tmp_path / "x.meo", tasks={"docs": tmp_path / "missing.txt"})
    with pytest.raises(ValueError, match="task name"):
        (tmp_path / "t.txt").write_text(TEXT)
        meo.convert(checkpoint, tmp_path / "x.meo", tasks={"bad name": tmp_path / "t.txt"})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(meo.ConvertError, match="config.json"):
        meo.convert(empty, tmp_path / "x.meo")
    assert not (tmp_path / "x.meo").exists()
    assert list(tmp_path.glob("x.meo*")) == [], "nothing half-written"


def test_compressed_conversion_equals_the_cli(checkpoint, tmp_path, text_file, meo_bin):
    out = tmp_path / "pruned.meo"
    meo.convert(checkpoint, out, calib=text_file, compress="prune:0.5")
    cli = tmp_path / "pruned-cli.meo"
    run_cli(meo_bin, "convert", checkpoint, "-o", cli, "--calib", text_file, "--compress", "prune:0.5")
    assert out.read_bytes() == cli.read_bytes()
    assert out.stat().st_size < meo.convert(checkpoint, tmp_path / "full.meo").file_bytes
    with pytest.raises(ValueError, match="compress"):
        meo.convert(checkpoint, tmp_path / "x.meo", calib=text_file, compress="prune:2")


def test_task_merges_convert_and_run(checkpoint, tmp_path, text_file):
    out = tmp_path / "task.meo"
    meo.convert(checkpoint, out, tasks={"docs": text_file})
    m = meo.Model(out, mode="task:docs", threads=1)
    assert m.mode == "task:docs"
    r = m.eval(TEXT, window=64, prompt_len=16)
    assert r.merged_layers == [0, 1] and sorted(r.merge_error_per_layer) == [0, 1]
    with pytest.raises(ValueError, match="unknown task"):
        meo.Model(out, mode="task:nope")


def test_model_properties(model, model_path):
    assert model.architecture == "mixtral"
    assert model.vocab_size == 256 and model.context_length == 512
    assert model.mode == "vanilla" and model.has_tokenizer
    assert model.path == str(model_path)
    ids = model.tokenize(PROMPT)
    assert model.detokenize(ids).endswith(PROMPT)


def test_greedy_ids_equal_meo_run(model, model_path, meo_bin):
    out = run_cli(meo_bin, "run", model_path, "--tokens", "5,17,42,9", "--max-new-tokens", "16", "--threads", "1")
    want = [int(t) for t in out.split()]
    c = model.generate([5, 17, 42, 9], max_new_tokens=16)
    assert c.tokens == want
    assert c.prompt_tokens == 4 and c.stop_reason in ("max_tokens", "stop_token")


def test_greedy_text_equals_meo_run(model, model_path, meo_bin):
    out = run_cli(meo_bin, "run", model_path, "-p", PROMPT, "--max-new-tokens", "20", "--threads", "1")
    c = model.generate(PROMPT, max_new_tokens=20)
    assert out == c.text + "\n"
    assert len(c.tokens) > 0


def test_seeded_sampling_equals_meo_run(model, model_path, meo_bin):
    flags = ["--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--seed", "7", "--repeat-penalty", "1.1"]
    out = run_cli(meo_bin, "run", model_path, "--tokens", "5,17,42,9", "--max-new-tokens", "24", "--threads", "1", *flags)
    kw = dict(temperature=0.9, top_k=40, top_p=0.95, seed=7, repeat_penalty=1.1, max_new_tokens=24)
    c = model.generate([5, 17, 42, 9], **kw)
    assert c.tokens == [int(t) for t in out.split()]
    assert model.generate([5, 17, 42, 9], **{**kw, "seed": 8}).tokens != c.tokens


def test_stop_strings(model):
    full = model.generate(PROMPT, max_new_tokens=20).text
    assert len(full) > 4
    stop = full[2:4]
    c = model.generate(PROMPT, max_new_tokens=20, stop=[stop])
    assert c.stop_reason == "stop_string"
    assert c.text == full[: full.index(stop)]


def test_streaming_yields_the_tokens_and_text_of_a_whole_generation(model):
    for prompt in (PROMPT, [5, 17, 42, 9]):
        whole = model.generate(prompt, max_new_tokens=24)
        stream = model.generate(prompt, max_new_tokens=24, stream=True)
        assert stream.completion is None
        chunks = list(stream)
        assert [c.token for c in chunks if c.token is not None] == whole.tokens
        assert "".join(c.text for c in chunks) == whole.text
        assert stream.completion.tokens == whole.tokens
        assert stream.completion.stop_reason == whole.stop_reason
        assert list(stream) == []


def test_a_cancelled_stream_stops(model):
    stream = model.generate([5, 17, 42, 9], max_new_tokens=400, stream=True)
    first = [next(stream), next(stream)]
    assert all(c.token is not None for c in first)
    stream.cancel()
    rest = list(stream)
    assert stream.completion.stop_reason == "cancelled"
    assert len(first) + len(rest) < 400


def test_a_failed_stream_raises_once_then_ends(model):
    stream = model.generate(PROMPT, temperature=-1.0, stream=True)
    with pytest.raises(ValueError, match="temperature"):
        next(stream)
    assert list(stream) == [] and stream.completion is None


def test_generations_run_in_parallel_threads(model):
    """The GIL is released while generating: threads get the results a lone call gets."""
    want = model.generate([5, 17, 42, 9], max_new_tokens=32).tokens
    got = [None] * 4

    def work(i):
        got[i] = model.generate([5, 17, 42, 9], max_new_tokens=32).tokens

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert got == [want] * 4


def test_chat_renders_the_models_template_and_matches_meo_run_chat(model, model_path, meo_bin):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The value"}]
    assert model.apply_chat_template(msgs) == "<|endoftext|><system>Be brief.\n<user>The value\n<assistant>"
    assert model.apply_chat_template(msgs, add_generation_prompt=False).endswith("<user>The value\n")
    out = run_cli(
        meo_bin, "run", model_path, "--chat", "--system", "Be brief.", "-p", "The value",
        "--max-new-tokens", "16", "--threads", "1",
    )
    c = model.chat(msgs, max_new_tokens=16)
    assert out == c.text + "\n"
    # The prompt fed is the rendering, tokenized without adding special tokens.
    ids = model.tokenize(model.apply_chat_template(msgs), add_special_tokens=False)
    assert c.prompt_tokens == len(ids)
    streamed = list(model.chat(msgs, max_new_tokens=16, stream=True))
    assert [x.token for x in streamed if x.token is not None] == c.tokens


def test_chat_templates_render_as_transformers(tmp_path):
    """Every case of tests/fixtures/chat_templates.json (transformers' apply_chat_template)."""
    fx = json.loads((FIXTURES / "chat_templates.json").read_text())
    for case in fx["cases"]:
        t = fx["templates"][case["template"]]
        sp = t["special_tokens"]
        tm = meo.ChatTemplate(
            t["source"],
            bos_token=sp.get("bos_token"),
            eos_token=sp.get("eos_token"),
            pad_token=sp.get("pad_token"),
            unk_token=sp.get("unk_token"),
            now=fx["now"],
        )
        args = dict(add_generation_prompt=case["add_generation_prompt"], template_vars=case["kwargs"])
        where = f'{case["template"]}: {case["name"]}'
        if case.get("expected") is not None:
            assert tm.render(case["messages"], **args) == case["expected"], where
        else:
            with pytest.raises(meo.ChatTemplateError) as e:
                tm.render(case["messages"], **args)
            assert case["error"] in str(e.value), where
    assert len(fx["cases"]) >= 20


def test_chat_without_a_template_is_a_clear_error(tmp_path):
    out = tmp_path / "plain.meo"
    meo.convert(FIXTURES / "mixtral", out)
    m = meo.Model(out)
    with pytest.raises(meo.ChatTemplateError, match="no chat template"):
        m.chat([{"role": "user", "content": "hi"}])
    with pytest.raises(meo.ChatTemplateError, match="does not compile"):
        meo.ChatTemplate("{% for %}")


def test_eval_equals_meo_eval(model, model_path, text_file, meo_bin):
    for mode in ("vanilla", "prompt"):
        out = run_cli(
            meo_bin, "eval", model_path, "--data", text_file, "--json", "--window", "64", "--prompt-len", "16",
            "--threads", "1", "--mode", mode,
        )
        want = json.loads(out)
        m = model if mode == "vanilla" else meo.Model(model_path, mode=mode, threads=1)
        r = m.eval(TEXT, window=64, prompt_len=16)
        assert r.mode == want["mode"]
        for k in ("perplexity", "vanilla_perplexity", "next_token_agreement", "kl_vs_vanilla",
                  "expert_bytes_per_token", "vanilla_expert_bytes_per_token"):
            assert getattr(r, k) == pytest.approx(want[k], rel=1e-12, abs=1e-15), k
        assert (r.windows, r.scored_tokens, r.merged_layers) == (
            want["windows"], want["scored_tokens"], want["merged_layers"])
        assert {str(k): v for k, v in r.merge_error_per_layer.items()} == pytest.approx(want["merge_error_per_layer"])
    assert r.mode == "prompt" and r.merged_layers == [0, 1] and r.kl_vs_vanilla > 0


def test_kv_dtype_equals_meo_eval_kv(model_path, text_file, meo_bin):
    out = run_cli(
        meo_bin, "eval", model_path, "--data", text_file, "--json", "--window", "64", "--prompt-len", "16",
        "--threads", "1", "--kv", "int8",
    )
    want = json.loads(out)
    m = meo.Model(model_path, threads=1, kv="int8")
    assert m.kv == "int8" and want["kv_dtype"] == "int8"
    r = m.eval(TEXT, window=64, prompt_len=16)
    assert r.perplexity == pytest.approx(want["perplexity"], rel=1e-12)
    assert r.kl_vs_vanilla == pytest.approx(want["kl_vs_vanilla"], rel=1e-12) and r.kl_vs_vanilla > 0
    with pytest.raises(ValueError, match="KV cache dtype"):
        meo.Model(model_path, kv="q4")


def test_bad_inputs_raise_the_right_exception(model, model_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.meo"):
        meo.Model(tmp_path / "nothing.meo")
    junk = tmp_path / "junk.meo"
    junk.write_bytes(b"not a model" * 100)
    with pytest.raises(meo.ModelError, match="junk.meo"):
        meo.Model(junk)
    assert issubclass(meo.ModelError, meo.MeoError)
    with pytest.raises(ValueError, match="mode"):
        meo.Model(model_path, mode="merged")
    with pytest.raises(ValueError, match="merge budget"):
        meo.Model(model_path, merge_budget=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(PROMPT, temperature=-1.0)
    with pytest.raises(ValueError, match="empty"):
        model.generate([])
    with pytest.raises(ValueError, match="token id 100000 at index 0 is out of range"):
        model.generate([100000])
    with pytest.raises(ValueError, match="too few"):
        model.eval("short", window=64, prompt_len=16)
    with pytest.raises(ValueError, match="prompt length"):
        model.eval(TEXT, window=10, prompt_len=9)
    with pytest.raises(ValueError, match="JSON"):
        model.apply_chat_template([{"role": "user", "content": object()}])
    with pytest.raises(TypeError):
        model.generate(3.5)
