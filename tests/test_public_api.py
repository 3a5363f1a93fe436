"""The public names the issues fix, importable from the package root."""

import pyramidflow


def test_public_names():
    assert set(pyramidflow.__all__) == {
        "InvertibleModule", "InvertibleSequential", "wrap", "check_inverse", "PyramidFlow", "PyramidFlowConfig",
        "DriftWarning", "DriftError", "Detector", "Prediction",
    }
    assert issubclass(pyramidflow.DriftWarning, UserWarning)
    assert pyramidflow.DriftError is pyramidflow.engine.DriftError
    for name in pyramidflow.__all__:
        assert getattr(pyramidflow, name) is not None


def test_default_config_is_the_papers():
    config = pyramidflow.PyramidFlowConfig()
    assert (config.channels, config.kernel_size, config.num_stacks, config.num_levels, config.volume_norm, config.mode) == (
        16, 7, 4, 4, "CVN", "invertible",
    )


def test_detector_is_imported_on_first_use_only():
    """``import pyramidflow`` stays light for engine users; ``from pyramidflow import Detector`` works."""
    import subprocess
    import sys

    code = ("import sys, pyramidflow; assert 'pyramidflow.inference.detector' not in sys.modules; "
            "from pyramidflow import Detector; assert Detector.__module__ == 'pyramidflow.inference.detector'")
    subprocess.run([sys.executable, "-c", code], check=True)
