"""The public names the issues fix, importable from the package root."""

import pyramidflow


def test_public_names():
    assert set(pyramidflow.__all__) == {
        "InvertibleModule", "InvertibleSequential", "wrap", "check_inverse", "PyramidFlow", "PyramidFlowConfig",
        "DriftWarning", "DriftError",
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
