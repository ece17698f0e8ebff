"""The layout's rules that import-linter's contracts (pyproject.toml, `lint-imports` in `make test`) cannot say:
no import circle anywhere among the project's modules, type-only imports included; app.py, the Lambda's entry,
imports the Lambda package only; the device client imports nothing of ours."""
import ast
import sys

import grimp
import pytest

from chalicelib.config import PROJECT_DIR

PACKAGES = ("chalicelib", "admin", "devstack", "bench")


def circles(graph: grimp.ImportGraph) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            module, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[module] = min(low[module], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[module])
            if low[module] == index[module]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == module:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    sys.path.insert(0, str(PROJECT_DIR))
    return grimp.build_graph(*PACKAGES, include_external_packages=False, exclude_type_checking_imports=False)


def test_no_import_circle_among_the_projects_modules(graph):
    assert circles(graph) == []


def test_the_circle_finder_finds_a_circle():
    made = grimp.ImportGraph()
    for module in ("p.a", "p.b", "p.c"):
        made.add_module(module)
    made.add_import(importer="p.a", imported="p.b")
    made.add_import(importer="p.b", imported="p.a")
    made.add_import(importer="p.b", imported="p.c")
    assert circles(made) == [{"p.a", "p.b"}]


def _imported(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_the_lambda_entry_imports_the_lambda_package_only():
    ours = {"chalicelib", *PACKAGES, "device", "tests"}
    assert _imported(PROJECT_DIR / "app.py") & ours == {"chalicelib"}


def test_the_device_client_imports_nothing_of_ours():
    assert _imported(PROJECT_DIR / "device" / "global_device.py") & {"app", *PACKAGES, "tests"} == set()
