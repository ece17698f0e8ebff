"""The Lambda's (and chalice local's) entry: the HTTP edge (chalicelib/edge/http.py) over the process's one
container (chalicelib/container.py), which reads the stage's settings from the environment."""
# First of all: inside Lambda this pauses the cyclic GC for the cold start (chalicelib/edge/coldstart.py).
from chalicelib.edge import coldstart  # isort: skip  # noqa: F401
from chalicelib.container import Container
from chalicelib.edge.http import create_app

container = Container()
container.validate()  # a wrong setting fails the start, not the first device
app = create_app(container)
