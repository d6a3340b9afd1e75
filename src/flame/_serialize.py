"""What pickles how: closures, the app's modules by reference, exceptions, large buffers.

Everything crosses the wire through :func:`dumps` / :func:`loads`, built on cloudpickle with
pickle protocol 5, and with four rules of our own:

* **The app's modules are looked up, not shipped.** A runner imports the parent's main
  script under another name (like multiprocessing's spawn) and aliases it as ``__main__``;
  every other module of the app it imports as the parent did. Functions and classes defined
  at the top of any module are pickled by reference. A lambda or closure written in a module
  the runner can import (:func:`runner_imports`: the main script, or any module loaded from
  a file under the name a plain import finds it by) is shipped as code, but its globals are
  looked up by name in the *runner's* import of that module at call time, so a module-level
  engine, lock or socket is the runner's own and never pickled. Only globals the runner's
  import cannot have (names a plain import of the module does not bind, such as those bound
  under ``if __name__ == "__main__":``, found by reading the module's syntax tree once)
  travel with the function, by value. Code from a module the runner cannot import (a
  notebook cell, ``python -c``, a module made at run time) ships with its globals by value.
* **Exceptions keep their class and attributes.** An exception whose class pickles it the
  default way (its ``args``) is rebuilt without calling its ``__init__``, so one whose
  ``__init__`` takes other arguments than its ``args`` still arrives whole.
* **Large buffers travel out of band.** ``bytes``, ``bytearray`` and ``memoryview`` arguments
  and results of at least :data:`OOB_THRESHOLD` bytes, and NumPy arrays at any depth, become
  protocol-5 buffers that the wire sends and receives without extra copies.
* **Failures name the culprit.** A function or argument that will not pickle raises
  :class:`SerializationError` saying which one (down to the closure variable or global).
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import io
import os
import pickle
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle

from ._errors import SerializationError

OOB_THRESHOLD = 64 * 1024
PROTOCOL = 5
_MAIN_ALIAS = "__mp_main__"


# -- the main module --------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _importable_names(path: str) -> frozenset[str] | None:
    """Names a plain import of the module at ``path`` binds at module level.

    Statements under ``if __name__ == "__main__":`` are skipped, as a runner's import skips
    them. ``None`` if the script cannot be read or parsed (then everything is shipped).
    """
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, ValueError):
        return None
    names: set[str] = set()

    def is_main_guard(node: ast.stmt) -> bool:
        if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
            return False
        parts = [node.test.left, *node.test.comparators]
        return any(isinstance(p, ast.Name) and p.id == "__name__" for p in parts) and any(
            isinstance(p, ast.Constant) and p.value == "__main__" for p in parts
        )

    scopes = (
        ast.FunctionDef,
        ast.AsyncFunctionDef,
        ast.ClassDef,
        ast.Lambda,
        ast.ListComp,
        ast.SetComp,
        ast.DictComp,
        ast.GeneratorExp,
    )

    def bind(node: ast.AST) -> None:
        """Names ``node`` binds in the module scope (not inside functions or comprehensions)."""
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                names.add((alias.asname or alias.name).split(".")[0])
            return
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        if isinstance(node, ast.stmt) and is_main_guard(node):
            assert isinstance(node, ast.If)
            for statement in node.orelse:
                bind(statement)
            return
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, scopes):
                bind(child)
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(child.name)

    for statement in tree.body:
        bind(statement)
    return frozenset(names)


def _main_names() -> frozenset[str] | None:
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or not isinstance(path, str):
        return None
    return _importable_names(path)


@functools.lru_cache(maxsize=1024)
def runner_imports(module: str) -> bool:
    """Whether a runner imports ``module`` itself, as the parent did (the main script is
    handled apart): a module loaded from a file, under the name a plain import finds that
    same file by, and not registered with cloudpickle to travel by value. Such a module is
    on the runner's ``sys.path`` (spawn-like backends share the parent's) or in its image
    (the same deployment), so its functions resolve their globals there."""
    mod = sys.modules.get(module)
    path = getattr(mod, "__file__", None)
    if mod is None or not isinstance(path, str) or not os.path.isfile(path):
        return False
    if cloudpickle.cloudpickle._is_registered_pickle_by_value(mod):
        return False
    spec = getattr(mod, "__spec__", None)
    if spec is None or spec.name != module:
        return False
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return False
    origin = getattr(found, "origin", None)
    return isinstance(origin, str) and os.path.realpath(origin) == os.path.realpath(path)


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


class _ModuleGlobals(dict[str, Any]):
    """Globals of a shipped function: its own shipped values first, then the runner's
    import of its module, looked up at every access (so module-level objects are the
    runner's own)."""

    def __init__(self, shipped: dict[str, Any], module: str) -> None:
        super().__init__(shipped)
        self._module = module

    def __missing__(self, key: str) -> Any:
        namespace = _namespace(self._module)
        if key in namespace:
            return namespace[key]
        raise KeyError(key)


def _namespace(module: str) -> dict[str, Any]:
    """The runner's import of ``module`` (the main script is ``__main__`` on a runner too)."""
    found = sys.modules.get(module)
    if found is None:
        found = importlib.import_module(module)
    return found.__dict__


def _make_module_function(
    code: types.CodeType,
    module: str,
    name: str,
    qualname: str,
    defaults: tuple[Any, ...] | None,
    kwdefaults: dict[str, Any] | None,
    closure: tuple[Any, ...] | None,
    fdict: dict[str, Any],
    shipped: dict[str, Any],
) -> types.FunctionType:
    g: dict[str, Any]
    if shipped or module == "__main__":
        g = _ModuleGlobals(shipped, module)
        g["__name__"] = module
    else:  # nothing to add: the module's own namespace, at full speed
        g = _namespace(module)
    cells = tuple(types.CellType(v) for v in closure) if closure is not None else None
    fn = types.FunctionType(code, g, name, defaults, cells)
    fn.__qualname__ = qualname
    fn.__kwdefaults__ = kwdefaults
    fn.__dict__.update(fdict)
    fn.__module__ = module
    return fn


_EMPTY = object()


def _cell_values(fn: types.FunctionType) -> tuple[Any, ...] | None:
    if fn.__closure__ is None:
        return None
    out = []
    for cell in fn.__closure__:
        try:
            out.append(cell.cell_contents)
        except ValueError:  # an empty cell (a name assigned later in the enclosing scope)
            out.append(_EMPTY)
    return tuple(out)


def _is_toplevel(obj: Any, module: str, names: frozenset[str]) -> bool:
    qualname = getattr(obj, "__qualname__", "")
    if "." in qualname or "<" in qualname or qualname not in names:
        return False
    return getattr(sys.modules.get(module), qualname, None) is obj


def _module_names(module: str) -> frozenset[str] | None:
    """What a plain import of ``module`` binds, if the runner imports it; else ``None``."""
    if module == "__main__":
        return _main_names()
    if not runner_imports(module):
        return None
    path = getattr(sys.modules.get(module), "__file__", None)
    return _importable_names(path) if isinstance(path, str) else None


# -- large buffers ----------------------------------------------------------------------------
def _bytes_from(buf: memoryview) -> bytes:
    return bytes(buf)


def _bytearray_from(buf: memoryview) -> bytearray:
    return bytearray(buf)


def _memoryview_from(buf: Any, fmt: str, shape: tuple[int, ...]) -> memoryview:
    """A memoryview of ``buf`` with the sender's format and shape (buffers arrive as bytes)."""
    view = memoryview(buf)
    if view.format != fmt or view.shape != shape:
        try:
            raw: Any = view.cast("B")  # typeshed wants a literal format
            view = raw.cast(fmt, shape)
        except (TypeError, ValueError):
            pass  # a format cast() cannot express: the raw bytes
    return view


def _reduce_memoryview(v: memoryview) -> tuple[Any, ...]:
    # a non-contiguous view cannot be a PickleBuffer: send a contiguous copy of its data
    data: Any = pickle.PickleBuffer(v) if v.c_contiguous else v.tobytes()
    return (_memoryview_from, (data, v.format, v.shape))


class _OOB:
    """Marks a large bytes-like value to be sent out of band."""

    __slots__ = ("value",)

    def __init__(self, value: bytes | bytearray | memoryview) -> None:
        self.value = value

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        v = self.value
        if isinstance(v, bytes):
            return (_bytes_from, (pickle.PickleBuffer(v),))
        if isinstance(v, bytearray):
            return (_bytearray_from, (pickle.PickleBuffer(v),))
        return _reduce_memoryview(v)


def _mark(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        size = value.nbytes if isinstance(value, memoryview) else len(value)
        if size >= OOB_THRESHOLD:
            if isinstance(value, memoryview) and not value.c_contiguous:
                return value
            return _OOB(value)
    return value


def mark_args(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Wrap large top-level bytes-like arguments so they travel out of band."""
    return tuple(_mark(a) for a in args)


mark_value = _mark


# -- the pickler ------------------------------------------------------------------------------
class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    def __init__(self, file: io.BytesIO, buffers: list[pickle.PickleBuffer]) -> None:
        super().__init__(file, protocol=PROTOCOL, buffer_callback=buffers.append)
        self._names: dict[str, frozenset[str] | None] = {}

    def _names_of(self, module: str) -> frozenset[str] | None:
        if module not in self._names:
            self._names[module] = _module_names(module)
        return self._names[module]

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.CodeType) and obj.co_filename != _DYNAMIC_CODE:
            # cloudpickle ships code as "<dynamic-code>"; keep the real file name, so that a
            # remote traceback through a lambda or closure names its file and source line
            return (_with_filename, (obj.replace(co_filename=_DYNAMIC_CODE), obj.co_filename))
        if isinstance(obj, types.FunctionType):
            module = obj.__module__
            names = self._names_of(module) if isinstance(module, str) else None
            if names is not None:
                if _is_toplevel(obj, module, names):
                    return NotImplemented  # pickled by reference: <module>.<name>
                return self._reduce_module_function(obj, module, names)
        elif isinstance(obj, type):
            if obj.__module__ == "__main__" and (names := self._names_of("__main__")) is not None:
                if _is_toplevel(obj, "__main__", names):
                    return NotImplemented
        elif isinstance(obj, BaseException):
            reduced = reduce_exception(obj)
            if reduced is not None:
                return reduced
        elif isinstance(obj, memoryview):
            return _reduce_memoryview(obj)
        return super().reducer_override(obj)

    def _reduce_module_function(
        self, fn: types.FunctionType, module: str, names: frozenset[str]
    ) -> Any:
        shipped = {}
        for name in _code_names(fn.__code__):
            if name in names or name not in fn.__globals__:
                continue  # the runner's own import binds it, or it is a builtin/attribute
            shipped[name] = fn.__globals__[name]
        return (
            _make_module_function,
            (
                fn.__code__,
                module,
                fn.__name__,
                fn.__qualname__,
                fn.__defaults__,
                fn.__kwdefaults__,
                _cell_values(fn),
                dict(fn.__dict__),
                shipped,
            ),
        )


_DYNAMIC_CODE = "<dynamic-code>"


def _with_filename(code: types.CodeType, filename: str) -> types.CodeType:
    return code.replace(co_filename=filename)


def reduce_exception(exc: BaseException) -> tuple[Any, ...] | None:
    """How to pickle an exception without calling its ``__init__`` again when unpickled: its
    class, ``args`` and attributes. ``None`` for a class that pickles itself its own way
    (a ``__reduce__`` of its own, or a builtin one)."""
    cls = type(exc)
    if cls.__module__ == "builtins" or cls.__reduce_ex__ is not object.__reduce_ex__:
        return None
    if cls.__reduce__ is not BaseException.__reduce__:
        return None
    state = dict(exc.__dict__) if getattr(exc, "__dict__", None) else None
    return (_rebuild_exception, (cls, exc.args, state))


def _rebuild_exception(
    cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any] | None
) -> BaseException:
    exc = cls.__new__(cls, *args)
    exc.args = args
    if state:
        exc.__dict__.update(state)
    return exc


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == _MAIN_ALIAS:
            module = "__main__"
        return super().find_class(module, name)


def dumps(obj: Any) -> tuple[bytes, list[memoryview]]:
    """Pickle ``obj``; return the stream and the out-of-band buffers (as memoryviews)."""
    f = io.BytesIO()
    buffers: list[pickle.PickleBuffer] = []
    _Pickler(f, buffers).dump(obj)
    return f.getvalue(), [b.raw() for b in buffers]


def loads(data: bytes | memoryview, buffers: Sequence[memoryview] = ()) -> Any:
    """Unpickle what :func:`dumps` made."""
    return _Unpickler(io.BytesIO(data), buffers=buffers).load()


def _describe(obj: Any) -> str:
    if isinstance(obj, types.FunctionType | types.BuiltinFunctionType | types.MethodType):
        return f"function {getattr(obj, '__qualname__', obj)!r}"
    if isinstance(obj, functools.partial):
        return f"functools.partial of {_describe(obj.func)}"
    tname = type(obj).__qualname__
    mod = type(obj).__module__
    full = tname if mod == "builtins" else f"{mod}.{tname}"
    return f"a {full} object"


def _try(obj: Any) -> Exception | None:
    try:
        dumps(obj)
    except Exception as exc:
        return exc
    return None


def _culprit(fn: Any) -> str:
    """Find what inside a function fails to pickle: a closure variable, a global, a default."""
    target = fn.func if isinstance(fn, functools.partial) else fn
    target = getattr(target, "__func__", target)
    if isinstance(fn, functools.partial):
        for i, a in enumerate(fn.args):
            if _try(a) is not None:
                return f"its bound argument {i} ({_describe(a)}) cannot be pickled"
        for k, v in (fn.keywords or {}).items():
            if _try(v) is not None:
                return f"its bound keyword {k!r} ({_describe(v)}) cannot be pickled"
    if isinstance(fn, types.MethodType) and _try(fn.__self__) is not None:
        return f"the object it is bound to ({_describe(fn.__self__)}) cannot be pickled"
    if isinstance(target, types.FunctionType):
        code = target.__code__
        for name, value in zip(code.co_freevars, _cell_values(target) or (), strict=False):
            if _try(value) is not None:
                return f"its closure variable {name!r} ({_describe(value)}) cannot be pickled"
        for name in sorted(_code_names(code)):
            if name in target.__globals__:
                value = target.__globals__[name]
                if not isinstance(value, types.ModuleType) and _try(value) is not None:
                    return f"the global {name!r} it uses ({_describe(value)}) cannot be pickled"
    return ""


class _NeedsCloudpickle(Exception):
    """The fast pickler met an object that only the full pickler handles right."""


class _FastPickler(pickle.Pickler):
    """Plain pickle (C) for the common call: functions and classes that import by name, and
    ordinary data. Whatever plain pickle would get wrong (main-script objects the runner's
    import does not define, exceptions) raises; whatever it cannot do (lambdas, closures,
    local classes, memoryviews) fails. Either way the call goes through :class:`_Pickler`."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.FunctionType | type) and getattr(obj, "__module__", None) == (
            "__main__"
        ):
            names = _main_names()
            if names is None or not _is_toplevel(obj, "__main__", names):
                raise _NeedsCloudpickle
        elif isinstance(obj, BaseException):
            raise _NeedsCloudpickle
        return NotImplemented


def _fast_dumps(obj: Any) -> tuple[bytes, list[memoryview]] | None:
    if getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", True):
        return None  # modules registered to travel by value: only cloudpickle knows them
    f = io.BytesIO()
    buffers: list[pickle.PickleBuffer] = []
    try:
        _FastPickler(f, protocol=PROTOCOL, buffer_callback=buffers.append).dump(obj)
    except Exception:
        return None
    return f.getvalue(), [b.raw() for b in buffers]


def dumps_call(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[bytes, list[memoryview]]:
    """Pickle a call; on failure raise :class:`SerializationError` naming what failed."""
    marked = mark_args(args)
    fast = _fast_dumps((fn, marked))
    if fast is not None:
        return fast
    try:
        return dumps((fn, marked))
    except Exception as exc:
        if _try(fn) is not None:
            detail = _culprit(fn)
            err = _try(fn)
            msg = f"cannot pickle the {_describe(fn)}"
            msg += f": {detail}" if detail else f": {err}"
            raise SerializationError(msg + f" ({type(err).__name__}: {err})") from exc
        for i, a in enumerate(args):
            err = _try(a)
            if err is not None:
                raise SerializationError(
                    f"cannot pickle argument {i} ({_describe(a)}): {type(err).__name__}: {err}"
                ) from exc
        raise SerializationError(f"cannot pickle the call: {type(exc).__name__}: {exc}") from exc


def dumps_value(value: Any, what: str) -> tuple[bytes, list[memoryview]]:
    """Pickle a result (or another value); failures raise :class:`SerializationError`.

    Plain pickle is tried first (several times faster for ordinary data); anything it
    cannot handle by reference (lambdas, local classes...) goes through cloudpickle."""
    marked = mark_value(value)
    buffers: list[pickle.PickleBuffer] = []
    try:
        data = pickle.dumps(marked, protocol=PROTOCOL, buffer_callback=buffers.append)
        return data, [b.raw() for b in buffers]
    except Exception:
        pass
    try:
        return dumps(marked)
    except Exception as exc:
        raise SerializationError(
            f"cannot pickle the {what} ({_describe(value)}): {type(exc).__name__}: {exc}"
        ) from exc
