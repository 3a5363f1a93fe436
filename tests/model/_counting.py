"""Counting evaluations of a coupling's network F, on whole levels (``joint``) or region by region (``window``)."""

from fractions import Fraction


class CountedNetwork:
    """Wraps ``net.joint``, ``net.window`` and ``net.window_with_state`` on the instance.

    ``calls`` grows by one entry per call: ``None`` for a whole-level evaluation, the samples × pixels of
    the output for a region's. :meth:`evaluations` adds them up in whole evaluations of a level
    (a region's backward making F's hidden activation again, ``window_state``, is not an evaluation).
    """

    NAMES = ("joint", "window", "window_with_state")

    def __init__(self, net):
        self.net = net
        self.calls = []
        self._inside_joint = False
        for name in self.NAMES:
            method = getattr(net, name)

            def counted(*args, _method=method, _name=name, **kwargs):
                if _name == "joint":
                    self.calls.append(None)
                    self._inside_joint = True
                    try:
                        return _method(*args, **kwargs)
                    finally:
                        self._inside_joint = False
                out = _method(*args, **kwargs)
                if not self._inside_joint:
                    rt = out[0] if isinstance(out, tuple) else out
                    self.calls.append(rt.shape[0] * rt.shape[-2] * rt.shape[-1])
                return out

            setattr(net, name, counted)

    def evaluations(self, level) -> Fraction:
        """Whole evaluations of F so far for the transformed level ``level`` ``(N, C, H, W)``."""
        whole = level.shape[0] * level.shape[-2] * level.shape[-1]
        return sum((Fraction(1) if c is None else Fraction(c, whole) for c in self.calls), Fraction(0))

    def remove(self):
        for name in self.NAMES:
            self.net.__dict__.pop(name, None)
