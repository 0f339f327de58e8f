"""Fixtures of the Python package's tests: a chat-capable model converted from the Mixtral
fixture, and the `meo` command line to compare with.

The CLI binary is $MEO_BIN, or target/release/meo of this repository (ci/test builds it before
this suite runs); without it the tests fail, they do not skip.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import meo

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
# The template the server's tests use: bos, one "<role>content\n" line per message.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
TEXT = (
    "Mixture-of-Experts layers route every token to a few experts. The router scores the "
    "experts, keeps the best ones and mixes their outputs with the gate weights. "
) * 6


@pytest.fixture(scope="session")
def meo_bin() -> Path:
    p = Path(os.environ.get("MEO_BIN") or REPO / "target" / "release" / "meo")
    if not p.is_file():
        raise RuntimeError(f"no meo binary at {p}: build it (cargo build --release -p meo-cli) or set MEO_BIN")
    return p


def run_cli(meo_bin: Path, *args: str) -> str:
    r = subprocess.run([str(meo_bin), *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """The Mixtral fixture with a chat template (tokenizer_config.json) added."""
    d = tmp_path_factory.mktemp("ck")
    for f in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]:
        shutil.copy(FIXTURES / "mixtral" / f, d / f)
    (d / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": TEMPLATE, "bos_token": "<|endoftext|>"})
    )
    return d


@pytest.fixture(scope="session")
def model_path(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("meo") / "chat.meo"
    meo.convert(checkpoint, out)
    return out


@pytest.fixture(scope="session")
def model(model_path) -> "meo.Model":
    return meo.Model(model_path, threads=1)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "data.txt"
    p.write_text(TEXT)
    return p
