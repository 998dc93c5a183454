"""``benchmarks/reference_eager.py``, the stand-in for the original IFSeg code that ``benchmarks/e2e.py`` measures
our speed-ups against, must compute the same network as the model (its position biases dense, every call)."""

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reference_eager  # noqa: E402

from ifseg_rt.model import build_model  # noqa: E402
from ifseg_rt.runtime import ImagePolicy  # noqa: E402
from ifseg_rt.world import render_scene  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_proxy_computes_the_models_logits():
    torch.manual_seed(0)
    M = 5
    model = build_model("tiny", M).eval()
    ids = [[100 + 3 * i, 101 + 3 * i] for i in range(M)]
    model.set_categories([0] + list(range(500, 508)) + [t for c in ids for t in c] + [600, 2], ids)
    image = render_scene(0, (96, 128)).image
    policy = ImagePolicy(short_side=96, max_long_side=256)
    x = torch.from_numpy(reference_eager.normalize(reference_eager.resize_bilinear(image, *policy.target_size(96, 128)))
                         [None])
    logits, features, (h, w) = reference_eager.forward(model, x)
    with torch.inference_mode():
        want_logits, want_features = model(x)[:2]
    assert (h, w) == (6, 8) and logits.shape == (1, h * w, M)
    np.testing.assert_allclose(logits.numpy(), want_logits.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(features.reshape(want_features.shape).numpy(), want_features.numpy(), atol=1e-5)
    labels, timings = reference_eager.segment(model, image, policy)
    assert labels.shape == (96, 128) and set(timings) == {"preprocess", "engine", "knn", "resize_argmax", "total"}
