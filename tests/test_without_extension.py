"""Without the compiled extension the package still imports and computes (Triton / reference),
and says once how to build the extension."""

import os
import subprocess
import sys
import textwrap


def test_package_works_and_warns_once_without_the_extension():
    script = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["kdkernels._C"] = None  # makes `from kdkernels import _C` fail like an unbuilt extension
        import torch
        import kdkernels
        assert kdkernels.backends.available("cpu") == ["torch"], kdkernels.backends.available("cpu")
        assert "not built" in kdkernels.backends.why_unavailable("cpu", "cpu")
        s, t = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = kdkernels.functional.kd_loss(s, t, 2.0)
            kdkernels.functional.kd_loss(s, t, 2.0)
        loss.backward()
        built = [w for w in caught if "pip install --no-build-isolation" in str(w.message)]
        assert len(built) == 1, [str(w.message) for w in caught]
        assert s.grad is not None and torch.isfinite(loss)
        print("ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # CPU tensors: only the reference can run then
    env.pop("KDKERNELS_BACKEND", None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
