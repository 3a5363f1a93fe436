"""Counting evaluations of a coupling's network F, plain (``joint``) or lean, for the tests."""


class CountedNetwork:
    """Wraps ``net.joint`` and ``net.lean`` on the instance; ``calls`` grows by one per evaluation."""

    def __init__(self, net):
        self.net = net
        self.calls = []
        for name in ("joint", "lean"):
            method = getattr(net, name)

            def counted(*args, _method=method, **kwargs):
                self.calls.append(1)
                return _method(*args, **kwargs)

            setattr(net, name, counted)

    def remove(self):
        for name in ("joint", "lean"):
            self.net.__dict__.pop(name, None)
