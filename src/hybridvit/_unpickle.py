"""A restricted unpickler: it builds tensors, storages and containers, and turns every other global of the
file into an inert stand-in. No code of the file ever runs.

`checkpoint.read_checkpoint_file` reads the zip and legacy `torch.save` formats itself (never through
`torch.load`, which hands TorchScript archives to `torch.jit.load`) and unpickles every pickle of the file
with this module, giving it the storages through `persistent_load`. Published checkpoints pickle objects
next to their weights (argparse Namespaces, yacs configs, numpy scalars): those become `Opaque` stand-ins
that keep their pickled state as data, so the files load.

The pure-Python `pickle._Unpickler` is used (the C one cannot be restricted opcode by opcode): every
opcode that calls something (REDUCE, BUILD, NEWOBJ, INST, OBJ, APPEND, SETITEM, ADDITEMS) is checked.
"""
from __future__ import annotations

import pickle
from collections import OrderedDict
from typing import Any

import torch

Unpickler_base = pickle._Unpickler  # the pure-Python implementation, whose dispatch table can be changed
UnpicklingError = pickle.UnpicklingError


class RefusedError(pickle.UnpicklingError):
    """The file asks for something this unpickler does not do (call a function, set an object's state)."""


class Opaque(dict):
    """Inert stand-in for an object of a class the file names (argparse.Namespace, a yacs CfgNode,
    os.system...): calling it, building it or setting its state only stores data."""

    _pickle_global = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def __setstate__(self, state: Any) -> None:
        self.pickled_state = state

    def __repr__(self) -> str:
        return f"<inert {self._pickle_global}>"


_STAND_INS: dict[str, type] = {}


def stand_in(module: str, name: str) -> type:
    key = f"{module}.{name}"
    if key not in _STAND_INS:
        _STAND_INS[key] = type(str(name), (Opaque,), {"__module__": str(module), "_pickle_global": key})
    return _STAND_INS[key]


class StorageType:
    """A typed storage class named by the file (`torch.FloatStorage`): only its dtype is used."""

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f"torch.{self.name}"


_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}


def _storage(obj: Any) -> Any:
    if not isinstance(obj, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise RefusedError(f"a tensor is rebuilt from a {type(obj).__name__}, not a storage")
    return obj


# rebuild functions of torch.save, each with its arguments checked and without backward hooks or Python
# state (hooks are callables that would run in backward; state sets arbitrary attributes)
def _rebuild_tensor(storage, storage_offset, size, stride):
    return torch._utils._rebuild_tensor(_storage(storage), storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if metadata is not None and not isinstance(metadata, dict):
        metadata = None
    return torch._utils._rebuild_tensor_v2(_storage(storage), storage_offset, size, stride, bool(requires_grad),
                                           OrderedDict(), metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if not isinstance(data, torch.Tensor):
        raise RefusedError(f"a parameter is rebuilt from a {type(data).__name__}, not a tensor")
    return torch.nn.Parameter(data, bool(requires_grad))


def _rebuild_from_type_v2(func, new_type, args, state):
    tensor = _call(func, tuple(args))
    if new_type is torch.nn.Parameter:
        return torch.nn.Parameter(tensor, tensor.requires_grad)
    if new_type is not torch.Tensor:
        raise RefusedError(f"refusing to rebuild a tensor as {new_type!r}")
    return tensor


def _encode(text, encoding="latin1"):
    # protocol 2 pickles bytes as _codecs.encode(str, 'latin1')
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise RefusedError("refusing _codecs.encode with other arguments than a string and latin1")
    return text.encode("latin1")


# globals the file may name: the callables (called by REDUCE) and plain values
_CALLABLES: dict[str, Any] = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "collections.OrderedDict": OrderedDict,
    "torch.Size": torch.Size,
    "torch.device": torch.device,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.complex": complex,
    "builtins.slice": slice,
    "_codecs.encode": _encode,
}
_VALUES: dict[str, Any] = {
    "torch.Tensor": torch.Tensor,
    "torch.nn.parameter.Parameter": torch.nn.Parameter,
    "torch.UntypedStorage": torch.UntypedStorage,
    **{f"torch.{n}": getattr(torch, n) for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)},
    **{f"torch.{n}": getattr(torch, n) for n in ("strided", "sparse_coo", "sparse_csr")},
}
_CALLABLE_IDS = {id(f) for f in _CALLABLES.values()}
_NEW_OK = (OrderedDict, dict, list, set, frozenset, tuple)  # classes NEWOBJ may instantiate


def _is_stand_in(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, Opaque)


def _call(func: Any, args: tuple) -> Any:
    if _is_stand_in(func):
        inst = func()
        inst.pickled_args = args
        return inst
    if id(func) in _CALLABLE_IDS:
        return func(*args)
    raise RefusedError(f"refusing to call {func!r}")


class Unpickler(Unpickler_base):
    """pickle.Unpickler that only builds tensors, storages, containers and inert stand-ins.

    persistent_load: the storage loader of the file format (`torch.save` writes storages as persistent
    ids); without one, a persistent id is refused."""

    dispatch = dict(Unpickler_base.dispatch)

    def __init__(self, file: Any, *, persistent_load: Any = None, limit: int | None = None, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._persistent = persistent_load
        self._limit = limit  # bytes the pickle can hold at most (its file's size): no length claim beyond it

    def load_bytearray8(self) -> None:
        # the pure-Python unpickler allocates the claimed length before reading: check it first
        import struct
        (n,) = struct.unpack("<Q", self.read(8))
        if self._limit is not None and n > self._limit or n > (1 << 40):
            raise RefusedError(f"a bytearray of {n} bytes in a pickle of {self._limit} bytes")
        b = bytearray(n)
        if self.readinto(b) != n:
            raise UnpicklingError("the pickle ends inside a bytearray")
        self.append(b)
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise RefusedError("the pickle refers to data outside itself (a persistent id), which only "
                               "torch.save files do")
        return self._persistent(pid)

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(name, str) and name.endswith("Storage") and name != "UntypedStorage":
            dtype = _STORAGE_DTYPES.get(name)  # torch.save names typed storages (FloatStorage, ...)
            if dtype is None:
                raise RefusedError(f"unknown storage type torch.{name}")
            return StorageType(name, dtype)
        module = {"torch.tensor": "torch._tensor"}.get(module, module)
        key = f"{module}.{name}"
        if key in _CALLABLES:
            return _CALLABLES[key]
        if key in _VALUES:
            return _VALUES[key]
        return stand_in(module, name)

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = _call(self.stack[-1], tuple(args))
    dispatch[pickle.REDUCE[0]] = load_reduce

    def _new(self, cls: Any, args: tuple, kwargs: dict | None = None) -> Any:
        if _is_stand_in(cls):
            return cls()
        if isinstance(cls, type) and cls in _NEW_OK:
            return cls.__new__(cls, *args)
        raise RefusedError(f"refusing to create a {cls!r}")

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, tuple(args)))
    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, tuple(args), kwargs))
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def _instantiate(self, klass: Any, args: list) -> None:  # INST and OBJ (protocols 0 and 1)
        self.append(_call(klass, ()) if _is_stand_in(klass) else self._new(klass, ()))

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Opaque):
            inst.__setstate__(state)
            return
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]
        if type(inst) is OrderedDict and isinstance(state, dict) and all(
                isinstance(k, str) and not k.startswith("__") for k in state):
            inst.__dict__.update(state)  # a state dict's `_metadata`
            return
        raise RefusedError(f"refusing to set the state of a {type(inst).__name__}")
    dispatch[pickle.BUILD[0]] = load_build

    def load_append(self) -> None:
        value = self.stack.pop()
        self._list(self.stack[-1]).append(value)
    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._list(self.stack[-1]).extend(items)
    dispatch[pickle.APPENDS[0]] = load_appends

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._dict(self.stack[-1])[key] = value
    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self) -> None:
        items = self.pop_mark()
        target = self._dict(self.stack[-1])
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_additems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if not isinstance(target, set):
            raise RefusedError(f"refusing to add items to a {type(target).__name__}")
        target.update(items)
    dispatch[pickle.ADDITEMS[0]] = load_additems

    @staticmethod
    def _list(obj: Any) -> list:
        if type(obj) is not list:
            raise RefusedError(f"refusing to append to a {type(obj).__name__}")
        return obj

    @staticmethod
    def _dict(obj: Any) -> dict:
        if type(obj) not in (dict, OrderedDict) and not isinstance(obj, Opaque):
            raise RefusedError(f"refusing to set items of a {type(obj).__name__}")
        return obj


def load(file: Any, **kwargs: Any) -> Any:
    return Unpickler(file, **kwargs).load()


def loads(data: bytes, **kwargs: Any) -> Any:
    import io
    return load(io.BytesIO(data), **kwargs)
