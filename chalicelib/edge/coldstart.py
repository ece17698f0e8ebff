"""A Lambda container's cold start without the cyclic garbage collector.

A cold start makes about 90,000 objects that live as long as the container (modules, botocore's models and
clients, the service) and almost no cyclic garbage (about 600 objects). The collector would scan them again
and again while they are being made: 125 young, 11 middle and one full collection, about 60 ms of CPU, a
seventh of a prod cold start (measured with gc.callbacks; bench/cold_start.py). So inside Lambda, importing
this module (app.py's first import) pauses the collector, and the end of the first event
resumes it with everything made so far frozen (gc.freeze: later collections skip it; the few hundred
garbage objects stay, once). Elsewhere (tests, chalice local, the CLI) it does nothing.
"""
import gc
import os

_paused = False


def pause() -> None:
    global _paused
    if os.environ.get("AWS_LAMBDA_FUNCTION_NAME") and gc.isenabled():
        gc.disable()
        _paused = True


def resume() -> None:
    """After the first event: freeze what the cold start made, collect again as usual. Idempotent."""
    global _paused
    if _paused:
        _paused = False
        gc.freeze()
        gc.enable()


pause()
