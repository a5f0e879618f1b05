"""IR text -> Module. The lark parser is built once (LALR, positions kept) and cached.

Types are taken as written; the verifier (ir/verify.py) checks them against inference. Errors
carry line:col and, for syntax errors, what the parser expected there.
"""
from __future__ import annotations

import base64
import functools
import json
from pathlib import Path

import lark
import numpy as np

from . import registry, symbolic
from .gc_pause import gc_paused
from .errors import IRParseError, NncError
from .graph import Function, Loc, Module, Op, Region, Value
from .verify import MAX_REGION_DEPTH
from .types import TensorType, dtype


@functools.lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    grammar = (Path(__file__).parent / "grammar.lark").read_text()
    return lark.Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)


def _unquote(tok: str) -> str:
    return json.loads(tok) if tok.startswith('"') else tok


def value_name(tok: str) -> str:
    return _unquote(tok[1:])


class _Builder:
    def __init__(self, text: str, filename: str):
        self.text = text
        self.filename = filename
        self.scopes: list[dict[str, Value]] = []

    def err(self, meta_or_tok, msg: str):
        line = getattr(meta_or_tok, "line", 0)
        col = getattr(meta_or_tok, "column", 0)
        raise IRParseError(f"{self.filename}:{line}:{col}: {msg}")

    # ---- scopes: region bodies see the values of enclosing scopes (ONNX outer-scope refs)
    def define(self, tok, t: TensorType) -> Value:
        name = value_name(str(tok))
        if name in self.scopes[-1]:
            self.err(tok, f"%{name} is defined twice")
        v = Value(name, t)
        self.scopes[-1][name] = v
        return v

    def lookup(self, tok) -> Value:
        name = value_name(str(tok))
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        self.err(tok, f"use of undefined value %{name}")

    # ---- tree walkers
    def module(self, tree) -> Module:
        funcs = [self.func(f) for f in tree.children]
        names = [f.name for f in funcs]
        if len(set(names)) != len(names):
            raise IRParseError(f"{self.filename}: duplicate function names {names}")
        return Module(funcs, loc_file=self.filename)

    def func(self, tree) -> Function:
        name_tok, *rest = tree.children
        block = rest[-1]
        args = [c for c in rest[:-1] if isinstance(c, lark.Tree) and c.data == "arg"]
        rtypes = [self.type(c) for c in rest[:-1] if isinstance(c, lark.Tree) and c.data == "type"]
        self.scopes.append({})
        argv = [self.define(a.children[0], self.type(a.children[1])) for a in args]
        ops, results = self.block(block)
        self.scopes.pop()
        if len(rtypes) != len(results) or any(t != r.type for t, r in zip(rtypes, results)):
            got = ", ".join(str(r.type) for r in results)
            self.err(tree.meta, f"function {name_tok} declares results ({', '.join(map(str, rtypes))}) "
                                f"but returns ({got})")
        return Function(argv, ops, results, name=str(name_tok)[1:])

    def block(self, tree):
        *ops, ret = tree.children
        built = [self.op(o) for o in ops]
        results = [self.lookup(t) for t in ret.children if t is not None]
        return built, results

    def region(self, tree) -> Region:
        *args, block = tree.children
        if len(self.scopes) > MAX_REGION_DEPTH:  # scopes: the function's plus one per open region
            self.err(tree.meta, f"regions nested too deep (more than {MAX_REGION_DEPTH} levels)")
        self.scopes.append({})
        argv = [self.define(a.children[0], self.type(a.children[1])) for a in args if a is not None]
        ops, results = self.block(block)
        self.scopes.pop()
        return Region(argv, ops, results)

    def op(self, tree) -> Op:
        results_t, name_tok, *rest = tree.children
        operands, attrs_t, types, loc_node = [], None, [], ""
        for c in rest:
            if c is None:
                continue
            if c.data == "operand_value":
                operands.append(self.lookup(c.children[0]))
            elif c.data == "operand_none":
                operands.append(None)
            elif c.data == "attr_dict":
                attrs_t = c
            elif c.data == "type":
                types.append(self.type(c))
            elif c.data == "loc":
                loc_node = _unquote(str(c.children[0]))
        loc = Loc(tree.meta.line, tree.meta.column, loc_node)
        name = str(name_tok)
        try:
            opdef = registry.get(name)
        except NncError:
            self.err(name_tok, f"unknown op {name!r}")
        raw = {}
        if attrs_t is not None:
            for a in attrs_t.children:
                if a is None:
                    continue
                k = str(a.children[0])
                if k in raw:
                    self.err(a.meta, f"attribute {k!r} given twice")
                raw[k] = self.attr_value(a.children[1])
        try:
            attrs = registry.make_attrs(opdef.attrs, raw, f"{name}")
        except NncError as e:
            self.err(tree.meta, str(e))
        res_toks = results_t.children
        if len(res_toks) != len(types):
            self.err(tree.meta, f"{name}: {len(res_toks)} results but {len(types)} result types")
        results = [self.define(t, ty) for t, ty in zip(res_toks, types)]
        return Op(name, operands, results, attrs, loc)

    def attr_value(self, t):
        if isinstance(t, lark.Token):
            raise AssertionError(t)
        d = t.data
        if d == "int":
            return int(t.children[0])
        if d == "float":
            return float(t.children[0])
        if d == "pinf":
            return float("inf")
        if d == "ninf":
            return float("-inf")
        if d == "nan":
            return float("nan")
        if d == "true":
            return True
        if d == "false":
            return False
        if d == "string":
            return _unquote(str(t.children[0]))
        if d == "ident":
            return str(t.children[0])
        if d == "list":
            return [self.attr_value(c) for c in t.children if c is not None]
        if d == "dense":
            body, ty_t = t.children
            ty = self.type(ty_t)
            if not ty.is_static:
                self.err(t.meta, f"dense tensor needs a static type, got {ty}")
            if body.data == "dense_b64":
                raw = base64.b64decode(_unquote(str(body.children[0])))
                arr = np.frombuffer(raw, dtype=ty.dtype.np).copy()
            else:
                vals = [self.attr_value(c) for c in body.children if c is not None]
                arr = np.array(vals, dtype=np.float64 if ty.dtype.is_float else None)
                arr = arr.astype(ty.dtype.np) if arr.size else np.zeros(0, ty.dtype.np)
            n = int(np.prod(ty.shape, dtype=np.int64))
            if arr.size != n:
                self.err(t.meta, f"dense tensor has {arr.size} values, its type {ty} needs {n}")
            return arr.reshape(ty.shape)
        if d == "region":
            return self.region(t)
        raise AssertionError(d)

    def type(self, t) -> TensorType:
        dt_tok, dims_t, lay = t.children
        if dims_t.data == "unranked":
            shape = None
        else:
            shape = tuple(self.dim(c) for c in dims_t.children if c is not None)
        layout = str(lay.children[0]) if lay is not None else None
        return TensorType(dtype(str(dt_tok)), shape, layout)

    def dim(self, t):
        """A dim expression tree -> Dim, without recursion: the tree of `N+N+...+N` is as deep as
        it has terms. Chains of + - (and of *) become one n-ary sum (product) in one step, so
        a 20,000-term sum takes linear time; an expression that stays deeper than
        symbolic.MAX_DEPTH after that is refused (everything downstream recurses on it)."""
        done: dict[int, object] = {}
        stack = [(t, None)]
        while stack:
            node, parts = stack.pop()
            if parts is None:
                parts = _dim_parts(node)
                if parts is not None:
                    stack.append((node, parts))
                    stack.extend((c, None) for _, c in parts if id(c) not in done)
                    continue
                done[id(node)] = self._dim_leaf(node)
                continue
            vals = [(sign, done[id(c)]) for sign, c in parts]
            d = node.data
            if d in ("dadd", "dsub"):
                done[id(node)] = symbolic.add_n([v if sign > 0 else symbolic.mul(-1, v) for sign, v in vals])
            elif d == "dmul":
                done[id(node)] = symbolic.mul_n([v for _, v in vals])
            elif d == "ddiv":
                done[id(node)] = symbolic.floordiv(vals[0][1], vals[1][1])
            elif d == "dneg":
                done[id(node)] = symbolic.mul(-1, vals[0][1])
            elif d == "dmax":
                done[id(node)] = symbolic.dmax(vals[0][1], vals[1][1])
            else:
                raise AssertionError(d)
        out = done[id(t)]
        if symbolic.depth(out) > symbolic.MAX_DEPTH:
            self.err(t.meta, f"dim expression nested too deep (more than {symbolic.MAX_DEPTH} levels)")
        return out

    def _dim_leaf(self, t):
        if isinstance(t, lark.Token):
            raise AssertionError(t)
        d = t.data
        if d == "dint":
            return int(t.children[0])
        if d == "dsym":
            return symbolic.sym(str(t.children[0]))
        if d == "dunknown":
            return symbolic.UNKNOWN
        raise AssertionError(d)


def _dim_parts(t):
    """(sign, subtree) operands of a dim node, a whole left-leaning +/- (or *) chain at once;
    None for a leaf."""
    d = t.data
    if d in ("dint", "dsym", "dunknown"):
        return None
    if d in ("dadd", "dsub", "dmul"):
        chain = ("dadd", "dsub") if d != "dmul" else ("dmul",)
        parts = []
        while isinstance(t, lark.Tree) and t.data in chain:
            parts.append((-1 if t.data == "dsub" else 1, t.children[1]))
            t = t.children[0]
        parts.append((1, t))
        return parts[::-1]
    return [(1, c) for c in t.children]


def read_ir_file(path) -> str:
    """The text of an IR file, with clear errors for what is not UTF-8 IR text (an ONNX model
    passed to `nnc opt`, say) instead of a UnicodeDecodeError."""
    p = Path(path)
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        text = None
        bad = e.start
    if text is None or "\0" in text:
        if p.suffix == ".onnx" or data[:1] == b"\x08":  # ModelProto starts with ir_version, field 1
            raise IRParseError(f"{p}: this looks like an ONNX model, not IR text; use `nnc ir` to "
                               f"import it or `nnc compile` to build it")
        if text is None:
            line = data[:bad].count(b"\n") + 1
            col = bad - (data.rfind(b"\n", 0, bad) + 1) + 1
            raise IRParseError(f"{p}:{line}:{col}: not UTF-8 text (byte 0x{data[bad]:02x}); IR files are UTF-8")
        raise IRParseError(f"{p}: contains NUL bytes; IR files are UTF-8 text")
    return text


def parse_file(path) -> Module:
    return parse(read_ir_file(path), str(path))


@gc_paused  # a big parse tree: see ir/gc_pause.py
def parse(text: str, filename: str = "<string>") -> Module:
    """Parses IR text. Weights are not loaded here: see ir.weights.load_module."""
    try:
        tree = _parser().parse(text)
    except lark.exceptions.UnexpectedInput as e:
        expected = sorted(getattr(e, "expected", None) or getattr(e, "allowed", None) or [])
        got = getattr(e, "token", None) or getattr(e, "char", None)
        ctx = e.get_context(text).rstrip("\n")
        msg = f"{filename}:{e.line}:{e.column}: unexpected {str(got)!r}"
        if expected:
            msg += f"; expected one of: {', '.join(expected[:12])}"
        raise IRParseError(msg + "\n" + ctx) from None
    return _Builder(text, filename).module(tree)


def parse_type(text: str) -> TensorType:
    """Parses a lone tensor type such as 'f32[N,3]' (used by tests and the CLI)."""
    m = parse(f"func @t(%a: {text}) -> ({text}) {{ return %a }}")
    return m.functions[0].args[0].type
