"""Without the compiled extension genflow imports, warns once how to build it, and samples on
the pure-PyTorch reference path with the same noise stream."""
import subprocess
import sys
import textwrap

import torch

import genflow as gf


def test_import_without_extension_warns_once_and_samples_identically(tmp_path):
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["genflow._C"] = None          # makes `import genflow._C` fail
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import genflow as gf
            import genflow.ops
        messages = [str(w.message) for w in caught if "genflow._C is not built" in str(w.message)]
        assert len(messages) == 1, messages
        assert "pip install -e ." in messages[0]
        assert not gf.HAS_EXTENSION
        import torch
        model = gf.GaussianMixture.ring().model(gf.VP())
        x = gf.sample(model, (16, 2), solver="euler_maruyama", steps=10, generator=3)
        torch.save(x, sys.argv[1])
    """)
    out = tmp_path / "x.pt"
    result = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    model = gf.GaussianMixture.ring().model(gf.VP())
    expected = gf.sample(model, (16, 2), solver="euler_maruyama", steps=10, generator=3)
    torch.testing.assert_close(torch.load(out), expected, rtol=1e-5, atol=1e-5)
