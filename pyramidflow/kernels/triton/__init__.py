"""The Triton implementation of the ops in :mod:`pyramidflow.kernels`, installed as ``pyramidflow.kernels.triton``.

One module per op, with the op's name (:mod:`.affine_coupling`,
:mod:`.volume_norm`), the ``@triton.jit`` helpers they share (:mod:`._math`),
their host-side launch settings (:mod:`._launch`) and the compile matrix
(:mod:`._compile`). :mod:`pyramidflow.kernels` dispatches here or to
:mod:`pyramidflow.kernels.reference`: the backends are named alike.

Importing this package imports no triton; the op modules do, and their
``import triton`` is absolute, so it finds the triton package, never this one.
"""

# NOTE [a subpackage named triton]
# The one way this package can shadow the real triton: a sys.path entry that
# points into kernels/ itself (Python started with kernels/ as its working
# directory), where `import triton` finds this folder as the top-level `triton`.
# Say so, instead of failing later on a missing `triton.jit`.
if __name__ == "triton":
    raise ImportError(
        f"`import triton` found pyramidflow's kernels/triton/ ({__file__}) instead of the triton package, "
        "because the kernels/ folder is on sys.path (is it the working directory?); run Python from another folder."
    )
