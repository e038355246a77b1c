"""Pass 4, code generation: the replacement call and the line edits that install it.

``write`` builds the ``F.scaled_dot_product_attention`` call (3-D ``bmm`` sites get a batch
dimension: the fused kernels take 4-D), its FlashAttention variants ([B, S, H, D]; FA4
falls back to SDPA without FA4 or a GPU) where the site takes no mask but a causal one,
and each one's edits: the chain's statements removed, the value product replaced,
returned weights replaced by None. How each library is called comes from its backend
record.
"""

from __future__ import annotations

import ast
import re

from ...backends import BACKENDS
from .chain import Chain, Op, Refused
from .site import Site
from .syntax import Function, const, dotted, strip_comment, wrap


class CallWriter:
    """Pass 4 over a ``syntax.Function`` (see the module docstring)."""

    def __init__(self, f: Function):
        self.f = f
        self._starts: list[int] | None = None
        self._guard = ""

    def write(self, chain: Chain, q_src: str, k_src: str, v_src: str, out_perm, mask_kw: str | None, causal: bool,
              gqa: bool, returned: list, lay: dict | None = None) -> None:
        """Set ``site.call``, ``site.flash_call``, ``site.fa4_call``, ``site.edits`` and
        ``site.variant_edits``; mark it swappable."""
        site, product, value = chain.site, chain.product, chain.value
        three_d = (lay or {}).get("batch", 2) == 1 or product["form"] in ("bmm", "baddbmm") or value["vform"] == "bmm"
        replay = mask_kw == "REPLAY"
        binds: dict[str, str] = {}
        if replay:
            q_src, k_src, zeros = self.replay_zeros(chain, lay, binds)
            mask_kw = "sdpa_mask"
        lib = (q_src, k_src, v_src, three_d, mask_kw, causal, value.get("dropout"), site, out_perm)
        q_lib = q_src
        if three_d:
            q_src, k_src, v_src = (f"{self.f.paren(s)}.unsqueeze(0)" for s in (q_src, k_src, v_src))
            if mask_kw and not replay:
                mask_kw = self.unsqueeze_mask(mask_kw)
        args = [q_src, k_src, v_src]
        if mask_kw:
            args.append(f"attn_mask={mask_kw}")
        drop = self.dropout_kw(value.get("dropout"), site)
        if drop and value.get("dropout_cond"):
            drop = f"({drop}) if {value['dropout_cond']} else 0.0"
        if drop:
            args.append(f"dropout_p={drop}")
        if causal:
            args.append("is_causal=True")
        args.append(f"scale={site.scale}")
        if gqa:
            args.append("enable_gqa=True")
        call = f"{self.f.functional}.scaled_dot_product_attention({', '.join(args)})"
        if three_d:
            call = f"{call}.squeeze(0)"
        if out_perm:
            call = f"{call}.permute({', '.join(map(str, out_perm))})"
        par = self.f.match.expr_parent.get(id(value["node"]))
        if not out_perm and isinstance(par, ast.Attribute) and par.attr == "view":
            call = f"{call}.contiguous()"  # (P @ V).view(...): SDPA's output is laid out [B, S, H, D]

        def install(text: str) -> list:
            """``site.call`` = ``text`` and the edits that put it in place of the chain."""
            site.call = text
            if replay:
                site.edits = self.replay_edits(chain, text, zeros, lay, q_src, three_d, binds)
            else:
                site.edits = self.edits(chain.block, chain.stmts, value["node"], text)
            self._value = (value["node"], site.edits[-1] if site.edits else None)
            self.neutralise_returns(chain, site, self._guard if replay else "", replay)
            return site.edits

        notes = list(site.notes)
        for name in ("flash_attention_2", "flash_attention_4"):
            text = self.library_variant(BACKENDS[name], *lib, sdpa_call=call, q_test=q_lib)
            if text:
                site.variant_edits[name] = install(text)
                site.notes = list(notes)  # the notes are said once, for the SDPA edits below
        site.flash_call = self.library_variant(BACKENDS["flash_attention_2"], *lib, sdpa_call=call, q_test=q_lib)
        site.fa4_call = self.library_variant(BACKENDS["flash_attention_4"], *lib, sdpa_call=call, q_test=q_lib)
        install(call)
        site.swappable = True

    @staticmethod
    def unsqueeze_mask(mask: str) -> str:
        m = re.fullmatch(r"\((.+) if (.+) else None\)", mask)
        if m:
            return f"({m.group(1)}.unsqueeze(0) if {m.group(2)} else None)"
        return f"{Function.paren(mask)}.unsqueeze(0)"

    def neutralise_returns(self, chain: Chain, site: Site, guard: str = "", replay: bool = False) -> None:
        """Returned weights or scores become None; ``x = x.detach()`` on their way out goes."""
        done = {e[0] for e in site.edits}
        for block, i in chain.returned_stmts:
            st = block[i]
            if st.lineno not in done:
                site.edits.append((st.lineno, st.end_lineno, self.pass_if_alone(block, [i])))
                done.add(st.lineno)
        by_stmt: dict[int, tuple[ast.stmt, list]] = {}
        for node, ret in chain.returned:
            by_stmt.setdefault(id(ret), (ret, []))[1].append(node)
        for ret, nodes in by_stmt.values():
            repl = {id(n): f"({n.id} if {guard} else None)" if guard else "None" for n in nodes}
            value_node = self._value[0] if getattr(self, "_value", None) else None
            if value_node is not None and any(n is value_node for n in ast.walk(ret)):
                repl[id(value_node)] = site.call  # `return p @ v, p`: the value product is here too
            kept = [e for e in site.edits if e[0] == ret.lineno]
            site.edits = [e for e in site.edits if e[0] != ret.lineno]
            before = []  # lines a replay edit put before the statement (the mask it builds)
            if replay and kept and len(kept[0][2]) > ret.end_lineno - ret.lineno + 1 and id(value_node) in repl:
                before = kept[0][2][:len(kept[0][2]) - (ret.end_lineno - ret.lineno + 1)]
            site.edits.append((ret.lineno, ret.end_lineno, before + self.render_lines(ret, repl)))
            names = ", ".join(sorted({n.id for n in nodes}))
            site.notes.append(f"line {ret.lineno} returned the attention {'weights' if any(n.id in chain.weight_names for n in nodes) else 'scores'} "
                              f"'{names}'; after the swap it returns None in their place, as transformers' "
                              "sdpa_attention_forward does (a fused kernel never forms them)")

    def pass_if_alone(self, block: list, removed: list[int]) -> list[str]:
        """[] to delete statements, or ['pass'] when they were all their block had."""
        if len(removed) == len(block):
            st = block[0]
            return [self.f.lines[st.lineno - 1][: self.f.char(self.f.lines[st.lineno - 1], st.col_offset)] + "pass"]
        return []

    # --- expression rewriting
    def _abs(self, line: int, col: int) -> int:
        if self._starts is None:
            self._starts, pos = [], 0
            for ln in self.f.lines:
                self._starts.append(pos)
                pos += len(ln) + 1
        return self._starts[line - 1] + self.f.char(self.f.lines[line - 1], col)

    def render(self, node: ast.AST, repl: dict[int, str]) -> str:
        """The source of ``node`` with the replaced descendants (``repl``: id(node) -> text)."""
        if id(node) in repl:
            return repl[id(node)]
        text = "\n".join(self.f.lines)
        start, end = self._abs(node.lineno, node.col_offset), self._abs(node.end_lineno, node.end_col_offset)
        spans = []
        todo = list(ast.iter_child_nodes(node))
        while todo:
            child = todo.pop()
            if id(child) in repl and hasattr(child, "lineno"):
                spans.append((self._abs(child.lineno, child.col_offset), self._abs(child.end_lineno,
                                                                                   child.end_col_offset),
                              repl[id(child)]))
            else:
                todo.extend(ast.iter_child_nodes(child))
        out = text[start:end]
        for a, b, new in sorted(spans, reverse=True):
            out = out[: a - start] + new + out[b - start:]
        return out

    def render_lines(self, st: ast.stmt, repl: dict[int, str]) -> list[str]:
        """The lines of statement ``st`` with ``repl`` applied (its indentation kept)."""
        first = self.f.lines[st.lineno - 1]
        prefix = first[: self.f.char(first, st.col_offset)]
        return (prefix + self.render(st, repl)).split("\n")

    # --- the replay form
    def replay_zeros(self, chain: Chain, lay: dict, binds: dict) -> tuple[str, str, str]:
        """(q, k for SDPA, the zero that replaces the score product): the product's operands
        are bound once (``name := ...``) when they are expressions, so nothing is computed twice."""
        product = chain.product
        sq, sk, ss = lay["letters"]
        qn, kn = lay["q_node"], lay["k_node"]
        q_text, k_text = self.f.seg(qn), self.f.seg(kn)
        q_name = q_text if dotted(qn) else self.fresh("sdpa_q")
        k_name = k_text if dotted(kn) else self.fresh("sdpa_k")
        first = {"q": f"({q_name} := {q_text})" if q_name != q_text else q_name,
                 "k": f"({k_name} := {k_text})" if k_name != k_text else k_name}
        dims = []
        for c in ss:
            if c in sq:
                dims.append(f"{q_name}.shape[{sq.index(c)}]")
            else:
                dims.append(f"{k_name}.shape[{sk.index(c)}]")
        # the first use binds the names: q in new_zeros, k in the first dim that reads it
        zero = f"{first['q']}.new_zeros(())"
        materialise = self.materialise(chain)
        if first["k"] != k_name:
            idx = next(n for n, d in enumerate(dims) if f"{k_name}.shape" in d)
            dims[idx] = dims[idx].replace(f"{k_name}.shape", f"{first['k']}.shape", 1)
        shape = ", ".join(dims)
        if product["form"] == "baddbmm":
            bias = self.f.seg(product["bias"])
            beta = product.get("beta")
            base = bias if beta is None or const(beta) in (1, 1.0) else f"({self.f.seg(beta)}) * {self.f.paren(bias)}"
            if const(beta) in (0, 0.0):
                base = zero
            zeros = f"{self.f.paren(base)}.expand({shape})" if base != zero else f"{zero}.expand({shape})"
            if base != zero:  # still bind q and k
                zeros = f"({first['q']}, {zeros})[1]" if first["q"] != q_name else zeros
        elif materialise:
            zeros = f"{first['q']}.new_zeros(({shape}))"
        else:
            zeros = f"{zero}.expand({shape})"
        binds.update(q=q_name, k=k_name)
        q_sdpa = lay["q"].replace(q_text, q_name, 1) if q_name != q_text else lay["q"]
        k_sdpa = lay["k"].replace(k_text, k_name, 1) if k_name != k_text else lay["k"]
        return q_sdpa, k_sdpa, zeros

    def materialise(self, chain: Chain) -> bool:
        """A real zero (not an expanded, memory-free one) when the scores are reshaped or pass a
        helper beyond "add this, if any": a sum with an expanded zero takes the other operand's
        layout, and a later .view() can fail (SAM's add_decomposed_rel_pos); or when an op
        writes the scores in place (``masked_fill_``, ``+=``): on an expanded zero every element
        is one memory location, and one write would reach them all."""
        for op in chain.ops:
            if op.kind == "shape" or _in_place(op):
                return True
            if op.kind == "call" and not self.adds_only(op.args[0]):
                return True
        return False

    def adds_only(self, func: ast.AST) -> bool:
        """Is ``func`` a helper of this file whose body is ``return s if m is None else s + m``?"""
        name = dotted(func).split(".")[-1]
        for node in getattr(self.f.module, "body", []):
            if isinstance(node, ast.FunctionDef) and node.name == name:
                body = [st for st in node.body if not (isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant))]
                if len(body) != 1 or not isinstance(body[0], ast.Return) or body[0].value is None:
                    return False
                allowed = (ast.IfExp, ast.BinOp, ast.Add, ast.Compare, ast.Is, ast.IsNot, ast.Name, ast.Load,
                           ast.Constant)
                return all(isinstance(n, allowed) for n in ast.walk(body[0].value))
        return False

    def fresh(self, base: str) -> str:
        used = {n.id for n in ast.walk(self.f.fn) if isinstance(n, ast.Name)} | {a.arg for a in ast.walk(self.f.fn)
                                                                                 if isinstance(a, ast.arg)}
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}{n}"
        return name

    def replay_edits(self, chain: Chain, call: str, zeros: str, lay: dict, q_src: str, three_d: bool,
                     binds: dict) -> list[tuple[int, int, list[str]]]:
        """Keep the chain's statements on a zero instead of the product: in-place updates of the
        scores become plain ones (an expanded zero cannot be written), softmax and dropout give
        their input back, the value product becomes the SDPA call with what they built as mask."""
        value = chain.value
        guard = self.fresh("eager_attention") if chain.guards else ""
        self._guard = guard

        def either(original: ast.AST, new: str) -> str:  # with guards: the original when they hold
            return f"({self.render(original, {})} if {guard} else {new})" if guard else new

        repl: dict[int, str] = {id(chain.product["node"]): either(chain.product["node"], zeros)}
        # scalar factors before the first mask only scale a zero (SDPA's scale has them): dropped,
        # as multiplying an expanded zero would allocate it
        dropped = set()
        plain = {id(chain.product["node"]): zeros}  # the new code alone, inside an `either`
        for op in chain.ops:
            if op.kind in ("add", "sub", "masked_fill", "where", "mulmask", "call", "shape"):
                break
            if op.kind in ("mul", "div") and op.cond is None:
                if isinstance(op.node, ast.BinOp):
                    score = op.node.left if op.kind == "div" or op.node.right is op.args[0] else op.node.right
                    plain[id(op.node)] = self.render(score, plain)
                    repl[id(op.node)] = either(op.node, plain[id(op.node)])
                elif isinstance(op.node, ast.stmt) and not chain.guards:
                    dropped.add(id(op.node))
        def span(n):
            return (n.end_lineno - n.lineno) * 10000 + n.end_col_offset - n.col_offset

        for node in sorted(chain.elide, key=span):  # innermost first: dropout(softmax(x)) -> x
            soft = self.f.match.is_softmax(node)
            inner = soft[0] if soft is not None else self.f.match.dropout_of(node)[1]
            text = self.render(inner, repl)
            text = text if isinstance(inner, (ast.Name, ast.Attribute, ast.Call, ast.Subscript)) else f"({text})"
            repl[id(node)] = either(node, text)
        statements: dict[int, tuple[list, int]] = {}
        for block, i in chain.all_stmts:
            statements[id(block[i])] = (block, i)
        for block, i, name in chain.inplace:
            statements[id(block[i])] = (block, i)
        vblock, vindex = value["stmt"]
        mask_src = self.render(value["p_operand"], repl)
        if lay.get("mask_perm"):
            mask_src = f"{self.f.paren(mask_src)}.permute({', '.join(map(str, lay['mask_perm']))})"
        call = either(value["node"], call)
        repl[id(value["node"])] = call
        edits, removed_by_block = [], {}
        inplace_ids = {id(block[i]) for block, i, _ in chain.inplace}
        for sid, (block, i) in statements.items():
            st = block[i]
            if isinstance(st, (ast.If, ast.For, ast.While, ast.With, ast.Try)):
                continue  # its inner statements are edited on their own
            if st is vblock[vindex]:
                continue
            if sid in inplace_ids:
                lines = self.outplace(st, repl)
            else:
                lines = self.render_lines(st, repl)
            if self.is_noop(st, lines) or sid in dropped:
                removed_by_block.setdefault(id(block), (block, []))[1].append(i)
                continue
            if lines != self.f.lines[st.lineno - 1: st.end_lineno]:
                edits.append((st.lineno, st.end_lineno, lines))
        for block, idx in removed_by_block.values():
            kept = self.pass_if_alone(block, idx)
            for n, i in enumerate(sorted(idx)):
                st = block[i]
                edits.append((st.lineno, st.end_lineno, kept if n == 0 else []))
        if guard:  # decided once, before the product: the tests read only parameters
            pblock, pindex = chain.product["loc"]
            pst = pblock[pindex]
            pfirst = self.f.lines[pst.lineno - 1]
            pindent = pfirst[: self.f.char(pfirst, pst.col_offset)]
            tests = " or ".join(f"({c})" for _, c, _ in chain.guards)
            line = f"{pindent}{guard} = bool({tests})  # SDPA cannot express what runs then: keep the original"
            done = False
            for n, (a, b, lines) in enumerate(edits):
                if a == pst.lineno:
                    edits[n] = (a, b, [line] + lines)
                    done = True
            if not done:
                edits.append((pst.lineno, pst.end_lineno, [line] + self.f.lines[pst.lineno - 1: pst.end_lineno]))
        st = vblock[vindex]
        first = self.f.lines[st.lineno - 1]
        indent = first[: self.f.char(first, st.col_offset)]
        mask = self.fresh("sdpa_mask")
        to = f".to({q_src.removesuffix('.unsqueeze(0)')}.dtype)"
        edits.append((st.lineno, st.end_lineno, [
            f"{indent}{mask} = {mask_src}  # what the chain added to the scores (replayed on a zero)",
            f"{indent}{mask} = {mask}{to}{'.unsqueeze(0)' if three_d else ''} if any({mask}.stride()) else None"
            "  # nothing added: no mask",
        ] + self.render_lines(st, {**repl, id(value['node']): call.replace('attn_mask=sdpa_mask', f'attn_mask={mask}')})))
        if guard:
            edits[-1] = (edits[-1][0], edits[-1][1], [ln.replace(f"{mask} = {mask}.to", f"{mask} = None if {guard} else {mask}.to", 1)
                                                       if n == 1 else ln for n, ln in enumerate(edits[-1][2])])
        return edits

    def outplace(self, st: ast.stmt, repl: dict) -> list[str]:
        """``x.masked_fill_(m, v)`` -> ``x = x.masked_fill(m, v)``; ``x op= y`` -> ``x = x op (y)``."""
        first = self.f.lines[st.lineno - 1]
        indent = first[: self.f.char(first, st.col_offset)]
        if isinstance(st, ast.AugAssign):
            op = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}[type(st.op)]
            name = st.target.id
            return (f"{indent}{name} = {name} {op} {self.f.paren(self.render(st.value, repl))}").split("\n")
        call = st.value
        name = dotted(call.func.value)
        args = ", ".join([self.render(a, repl) for a in call.args] +
                         [f"{k.arg}={self.render(k.value, repl)}" for k in call.keywords])
        attr = call.func.attr
        if attr == "masked_fill_":
            return f"{indent}{name} = {name}.masked_fill({args})".split("\n")
        op = {"mul_": "*", "div_": "/", "add_": "+", "sub_": "-"}[attr]
        return f"{indent}{name} = {name} {op} {self.f.paren(args)}".split("\n")

    @staticmethod
    def is_noop(st: ast.stmt, lines: list[str]) -> bool:
        """``x = x`` (what a softmax or dropout statement becomes in the replay form)."""
        text = " ".join(ln.strip() for ln in lines)
        m = re.fullmatch(r"(\w+) = \(?(\w+)\)?(\s*#.*)?", text)
        return bool(m and m.group(1) == m.group(2))

    def library_variant(self, record, q: str, k: str, v: str, three_d: bool, mask_kw, causal: bool, dropout,
                        site: Site, out_perm, *, sdpa_call: str, q_test: str) -> str:
        """The site as ``record``'s FlashAttention call ([B, S, H, D]); '' for a mask other than
        causal or dropout the library lacks (one that ``falls_back_to_sdpa`` takes SDPA on
        dropout, without its import, or off a GPU). Causal sites are square (tril/triu): SDPA's
        top-left and flash-attn's bottom-right agree."""
        if mask_kw:
            return ""
        site_drop = self.dropout_kw(dropout, Site("", "", 0, 0, "")) if dropout else ""
        if site_drop and not record.supports("dropout").supported and not record.falls_back_to_sdpa:
            return ""
        if three_d:  # [B*H, S, D] -> [B*H, S, 1, D]
            q, k, v = (f"{self.f.paren(x)}.unsqueeze(2)" for x in (q, k, v))
        else:  # [B, H, S, D] -> [B, S, H, D]
            q, k, v = (f"{self.f.paren(x)}.transpose(1, 2)" for x in (q, k, v))
        args = [q, k, v]
        if site_drop and record.supports("dropout").supported:
            args.append(f"dropout_p={site_drop}")
        args.append(f"softmax_scale={site.scale}")
        if causal:
            args.append("causal=True")
        call = f"{record.source_name}({', '.join(args)})" + ("[0]" if record.returns_tuple else "")
        call += ".squeeze(2)" if three_d else ".transpose(1, 2)"
        if out_perm:
            call = f"{call}.permute({', '.join(map(str, out_perm))})"
        if record.falls_back_to_sdpa:
            use = f"{record.source_name} is not None and {self.f.paren(q_test)}.is_cuda"
            if site_drop and not record.supports("dropout").supported:  # dropout active: SDPA applies it
                use += f" and ({site_drop}) == 0"
            call = f"({call} if {use} else {sdpa_call})"
        return call

    def dropout_kw(self, dropout: tuple | None, site: Site) -> str:
        if dropout is None:
            return ""
        if dropout[0] == "module":
            mod = self.f.seg(dropout[1])
            site.dropout = f"nn.Dropout {mod}"
            return f"{mod}.p if {mod}.training else 0.0"
        p, training = dropout[1], dropout[2]
        p_src = self.f.seg(p) if p is not None else "0.5"
        if training is None:
            site.dropout = f"F.dropout p={p_src} (always, training defaults to True)"
            return p_src
        site.dropout = f"F.dropout p={p_src} when {self.f.seg(training)}"
        return f"{p_src} if {self.f.seg(training)} else 0.0"

    def edits(self, block, chain: list[int], product_node: ast.AST, call: str) -> list[tuple[int, int, list[str]]]:
        """Remove the chain's statements, and those between them that only fed them
        (``dead_between``); replace the value product inside the last one."""
        out = []
        removed = [i for i in chain[:-1] if i != chain[-1]]
        removed = sorted(set(removed) | dead_between(block, removed, chain[-1]))
        for i in removed:
            st = block[i]
            out.append((st.lineno, st.end_lineno, []))
        last = block[chain[-1]]
        lines = self.f.lines[last.lineno - 1: last.end_lineno]
        # replace [product_node] span inside these lines
        rel_start = product_node.lineno - last.lineno
        rel_end = product_node.end_lineno - last.lineno
        prefix = lines[rel_start][: self.f.char(lines[rel_start], product_node.col_offset)]
        suffix = strip_comment(lines[rel_end][self.f.char(lines[rel_end], product_node.end_col_offset):])
        new = lines[:rel_start] + wrap(prefix, call, suffix) + lines[rel_end + 1:]
        out.append((last.lineno, last.end_lineno, new))
        return out


def _names(st: ast.AST, ctx: type) -> set[str]:
    return {n.id for n in ast.walk(st) if isinstance(n, ast.Name) and isinstance(n.ctx, ctx)}


def dead_between(block: list[ast.stmt], removed: list[int], last: int) -> set[int]:
    """Statements inside the chain that read a name the swap removes (``wdtype =
    weight.dtype``) and whose names nothing kept reads: they go with it. Raises ``Refused``,
    naming both lines, for one whose names are still read."""
    lost = set().union(*(_names(block[i], ast.Store) for i in removed)) if removed else set()
    gone: set[int] = set()
    for i in range(min(removed, default=last), last):
        st = block[i]
        if i in removed or not (_names(st, ast.Load) & lost):
            continue
        sets = _names(st, ast.Store)
        readers = [block[j] for j in range(i + 1, len(block)) if j not in removed and j not in gone
                   and (j == last or _names(block[j], ast.Load) & sets)]
        live = [r for r in readers if _names(r, ast.Load) & sets]
        if live or not sets:
            name = sorted(_names(st, ast.Load) & lost)[0]
            raise Refused(f"line {st.lineno} reads '{name}', which the swap removes"
                          + (f", and line {live[0].lineno} reads what it sets" if live else ""))
        gone.add(i)
        lost |= sets
    return gone


def _in_place(op: Op) -> bool:
    """Whether ``op`` (a chain ``Op``) writes the scores in place: ``x op= y`` or a call of a
    ``name_`` method such as ``masked_fill_``."""
    nodes = [n for part in (op.node, op.stmt) if part is not None for n in ast.walk(part)]
    return any(isinstance(n, ast.AugAssign) or isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
               and n.func.attr.endswith("_") and not n.func.attr.startswith("_") for n in nodes)
