"""Shared test fixtures: the miniature model, and a tiny random pipeline with SD v1.4's interface."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# One thread, as common.load_pipeline uses for the miniature model on a CPU: its many small kernels run as
# fast on one thread as on two, and two threads slow to a crawl when another process shares the cores.
torch.set_num_threads(1)

import common  # noqa: E402


def refused(capsys, call) -> str:
    """Run call(); it must stop with exit status 2 and one line on stderr, which is returned (the project's
    rule for a user mistake: one sentence, no traceback, nothing written)."""
    with pytest.raises(SystemExit) as exc:
        call()
    message = str(exc.value)
    assert exc.value.code == 2 and message.startswith("error: ") and "\n" not in message
    assert capsys.readouterr().err.strip().splitlines()[-1] == message
    return message


def build_sd_like(folder: Path) -> Path:
    """A randomly initialised pipeline with SD v1.4's interface, saved in diffusers layout: the real
    CLIP BPE tokenizer (49,408 ids, 77 tokens), 768-wide context, 4-channel latents (VAE factor 8) and
    16 cross-attention (attn2) layers in SD v1.4's down/mid/up arrangement, with narrow channels and
    one text layer (sdscale.py builds the full-size one from the same function)."""
    import sdscale

    return sdscale.build_pipeline(folder / "pipeline", **sdscale.NARROW)


@pytest.fixture(scope="session")
def sd_like_path(tmp_path_factory) -> Path:
    return build_sd_like(tmp_path_factory.mktemp("sd_like"))


@pytest.fixture()
def sd_like(sd_like_path):
    return common.load_pipeline(str(sd_like_path), device="cpu")


@pytest.fixture()
def toy():
    return common.load_pipeline("toy", device="cpu")
