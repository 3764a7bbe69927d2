#!/usr/bin/env python3
"""Layout check for agent/src: function lengths, file lengths, import cycles.

Usage: tests/tools/layout_check.py [--fn-max 120] [--file-max 600] [SRC]

Prints functions over the limit, files over the limit, and the strongly
connected components (size > 1) of the file-level import graph, built from
`crate::…` and `super::…` paths (a child module's `use super::…` to its own
ancestors is not counted: that is the module tree, not a layer edge).
Also prints the same graph folded to top-level folders (layers).
Exit status 1 if anything is over the limits or a cycle exists.
"""
import os
import re
import sys


def strip(src):
    """Blank out comments, strings and char literals, keep newlines."""
    out = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif src.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif src.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        elif c == "r" and re.match(r'r#*"', src[i:i + 10]) and (i == 0 or not (src[i - 1].isalnum() or src[i - 1] == "_")):
            m = re.match(r'r(#*)"', src[i:])
            close = '"' + m.group(1)
            j = src.find(close, i + len(m.group(0)))
            j = n if j < 0 else j + len(close)
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            j += 1
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        elif c == "'":
            m = re.match(r"'(\\.[^']*|[^\\'])'", src[i:])
            if m:
                out.append(" " * len(m.group(0)))
                i += len(m.group(0))
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def modpath(root, path):
    rel = os.path.relpath(path, root)[:-3].split(os.sep)
    if rel[-1] in ("mod", "lib", "main"):
        rel = rel[:-1]
    return tuple(rel)


FN = re.compile(r"\bfn\s+([A-Za-z_][A-Za-z0-9_]*)")


def functions(text):
    """(name, first line, length in lines) for each fn with a body."""
    res = []
    for m in FN.finditer(text):
        i, depth_paren = m.end(), 0
        while i < len(text):
            ch = text[i]
            if ch in "([<":
                depth_paren += 1
            elif ch in ")]>":
                depth_paren -= 1 if not (ch == ">" and text[i - 1] == "-") else 0
            elif ch == ";" and depth_paren <= 0:
                i = -1
                break
            elif ch == "{" and depth_paren <= 0:
                break
            i += 1
        if i < 0 or i >= len(text):
            continue
        depth, j = 0, i
        while j < len(text):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        start = text.count("\n", 0, m.start()) + 1
        end = text.count("\n", 0, j) + 1
        res.append((m.group(1), start, end - start + 1))
    return res


def expand_use(body):
    """Expand a use tree `a::{b, c::{d}}` into paths."""
    body = re.sub(r"\s+", "", body)

    def rec(prefix, s):
        paths, depth, cur = [], 0, ""
        parts = []
        for ch in s:
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
                continue
            depth += ch == "{"
            depth -= ch == "}"
            cur += ch
        parts.append(cur)
        for p in parts:
            if not p:
                continue
            if "{" in p:
                k = p.index("{")
                head = p[:k].rstrip(":")
                inner = p[k + 1:p.rindex("}")]
                paths += rec(prefix + ([x for x in head.split("::") if x]), inner)
            else:
                p = re.sub(r"as\w+$", "", p) if False else p.split("as")[0] if re.search(r"\bas\b", p) else p
                paths.append(prefix + [x for x in p.split("::") if x])
        return paths

    return rec([], body)


def main():
    args = sys.argv[1:]
    fn_max, file_max = 120, 600
    if "--fn-max" in args:
        k = args.index("--fn-max")
        fn_max = int(args[k + 1])
        del args[k:k + 2]
    if "--file-max" in args:
        k = args.index("--file-max")
        file_max = int(args[k + 1])
        del args[k:k + 2]
    root = args[0] if args else os.path.join(os.path.dirname(__file__), "../../agent/src")
    root = os.path.normpath(root)
    files = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            if f.endswith(".rs"):
                p = os.path.join(d, f)
                files[modpath(root, p)] = p
    bad = 0
    long_fns, long_files = [], []
    graph = {m: set() for m in files}
    for mod, p in sorted(files.items()):
        src = open(p).read()
        nlines = src.count("\n")
        if nlines > file_max:
            long_files.append((nlines, p))
        text = strip(src)
        for name, line, length in functions(text):
            if length > fn_max:
                long_fns.append((length, f"{os.path.relpath(p, root)}:{line} {name}"))
        refs = []
        for m in re.finditer(r"\buse\s+([^;]*);", text):
            for path in expand_use(m.group(1)):
                refs.append(path)
        for m in re.finditer(r"\b((?:crate|super)(?:::[A-Za-z_][A-Za-z0-9_]*)+)", text):
            refs.append(m.group(1).split("::"))
        for path in refs:
            if not path:
                continue
            if path[0] == "crate":
                tgt = list(path[1:])
            elif path[0] == "super":
                base = list(mod)
                k = 0
                while k < len(path) and path[k] == "super":
                    base = base[:-1]
                    k += 1
                rest = list(path[k:])
                if not rest:
                    continue  # `use super::*` or similar: the parent itself
                tgt = base + rest
                # the child naming its own ancestor module is the module tree
                if tuple(tgt[:len(base)]) == tuple(base) and len(rest) >= 1 and tuple(base + rest[:1]) not in files:
                    continue
            else:
                continue
            # longest prefix that is a module file
            best = None
            for k in range(len(tgt), 0, -1):
                if tuple(tgt[:k]) in files:
                    best = tuple(tgt[:k])
                    break
            if best is None or best == mod:
                continue
            if mod[:len(best)] == best:
                continue  # ancestor
            graph[mod].add(best)
    # Tarjan SCC
    index, low, stack, on, sccs = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(10000)

    def strong(v, g):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                strong(w, g)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(comp)

    def run(g):
        index.clear(); low.clear(); stack.clear(); on.clear(); sccs.clear()
        for v in g:
            if v not in index:
                strong(v, g)
        return [sorted("::".join(c) or "crate" for c in s) for s in sccs]

    file_cycles = run(graph)
    layers = {}
    for m, ts in graph.items():
        a = m[:1]
        layers.setdefault(a, set())
        for t in ts:
            if t[:1] != a:
                layers[a].add(t[:1])
    for ts in list(layers.values()):
        for t in ts:
            layers.setdefault(t, set())
    layer_cycles = run(layers)
    print(f"functions over {fn_max} lines:")
    for n, w in sorted(long_fns, reverse=True):
        print(f"  {n:5} {w}")
    print(f"files over {file_max} lines:")
    for n, w in sorted(long_files, reverse=True):
        print(f"  {n:5} {w}")
    print("file-level import cycles:")
    for c in file_cycles:
        print("  " + " ".join(c))
    print("folder-level import cycles:")
    for c in layer_cycles:
        print("  " + " ".join(c))
    if "--graph" in args or os.environ.get("LAYOUT_GRAPH"):
        for a in sorted(layers):
            print("  " + ("::".join(a) or "crate") + " -> " + ", ".join(sorted("::".join(t) for t in layers[a])))
    bad = long_fns or long_files or file_cycles or layer_cycles
    sys.exit(1 if bad else 0)


main()
