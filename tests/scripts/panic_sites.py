#!/usr/bin/env python3
"""Counts the places non-test code can panic, per category, for docs/panics.md.

Usage: tests/scripts/panic_sites.py [--list CATEGORY] [CRATE_SRC ...]
(default: cusedev/src vhost/src fakehost/src vmbus/src, run from the workspace root).

Test code is left out: files declared `#[cfg(test)] mod x;` (with or without `#[path]`), and
every item under a `#[cfg(test)]` attribute (found by brace matching, strings and comments
skipped). What is left is grepped line by line; comments do not count.
"""
import os
import re
import sys

CATEGORIES = {
    "unwrap": re.compile(r"\.unwrap\(\)"),
    "expect": re.compile(r"\.expect\("),
    "panic!": re.compile(r"\bpanic!\("),
    "unreachable!": re.compile(r"\bunreachable!\("),
    "todo!/unimplemented!": re.compile(r"\b(todo|unimplemented)!\("),
    "assert! (run time)": re.compile(r"(?<!debug_)\bassert(_eq|_ne)?!\("),
    "thread::spawn": re.compile(r"\bthread::spawn\("),
    # Less certain: each hit is read by hand (docs/panics.md says which are input-reachable).
    "range index x[a..b]": re.compile(r"(?<=[\w\)\]])\[[^\[\]\n]*\.\.[^\[\]\n]*\]"),
    "variable index x[i]": re.compile(r"(?<=[\w\)\]])\[[a-z_][\w.]*(\s*[-+*]\s*[\w.]+)*\]"),
    "copy_from_slice/split_at": re.compile(r"\.(copy_from_slice|clone_from_slice|split_at(_mut)?)\("),
    "sized allocation": re.compile(r"\bvec!\[[^\]\n]*;|\bwith_capacity\(|\.resize\("),
    "Instant + Duration": re.compile(r"Instant::now\(\)\s*\+"),
    # Not a panic: a poisoned lock taken as it is (decision 58). Counted to keep the rule visible.
    "poisoned lock recovered": re.compile(r"\.into_inner\(\)"),
}


def blank_strings_and_comments(text):
    """The text with comments, string and char literals replaced by spaces (newlines kept)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:]) and (i == 0 or not text[i - 1].isalnum()):
            hashes = re.match(r"r(#*)\"", text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            end = n if end < 0 else end + 1 + len(hashes)
            out.append('"' + re.sub(r"[^\n]", " ", text[i + 1:end - 1]) + '"')
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('"' + re.sub(r"[^\n]", " ", text[i + 1:j]) + '"')
            i = j + 1
        elif c == "'" and re.match(r"'(\\.|[^\\'])'|'\\[xu]", text[i:]):
            m = re.match(r"'(\\u\{[0-9a-fA-F]+\}|\\x[0-9a-fA-F]{2}|\\.|[^\\'])'", text[i:])
            length = len(m.group(0)) if m else 3
            out.append("' '" + " " * (length - 3))
            i += length
        else:
            out.append(c)
            i += 1
    return "".join(out)


def item_end(code, start):
    """Index just past the item starting at `start`: its matching `}` or its `;`."""
    depth = 0
    for j in range(start, len(code)):
        if code[j] == "{":
            depth += 1
        elif code[j] == "}":
            depth -= 1
            if depth == 0:
                return j + 1
        elif code[j] == ";" and depth == 0:
            return j + 1
    return len(code)


CFG_TEST = re.compile(r"#\[cfg\(test\)\]")


def strip_test_items(path, code, excluded):
    """Blanks every `#[cfg(test)]` item; records test module files in `excluded`."""
    code = list(code)
    text = "".join(code)
    for m in CFG_TEST.finditer(text):
        start = m.end()
        end = item_end(text, start)
        item = text[start:end]
        decl = re.search(r"\bmod\s+(\w+)\s*;", item)
        if decl:
            given = re.search(r'#\[path\s*=\s*"([^"]+)"\]', ORIGINAL[path][m.start():m.start() + (end - m.start()) + 40])
            base = os.path.dirname(path)
            if not os.path.basename(path) in ("lib.rs", "main.rs", "mod.rs"):
                base_mod = os.path.join(base, os.path.basename(path)[:-3])
            else:
                base_mod = base
            if given:
                excluded.add(os.path.normpath(os.path.join(base, given.group(1))))
            else:
                excluded.add(os.path.normpath(os.path.join(base_mod, decl.group(1) + ".rs")))
                excluded.add(os.path.normpath(os.path.join(base_mod, decl.group(1), "mod.rs")))
        for k in range(m.start(), end):
            if code[k] != "\n":
                code[k] = " "
    return "".join(code)


ORIGINAL = {}


def main(argv):
    listing = None
    if len(argv) > 1 and argv[1] == "--list":
        listing = argv[2]
        argv = argv[2:]
    roots = argv[1:] or ["cusedev/src", "vhost/src", "fakehost/src", "vmbus/src"]
    files = []
    for root in roots:
        for d, _, names in os.walk(root):
            files += [os.path.normpath(os.path.join(d, f)) for f in names if f.endswith(".rs")]
    excluded, stripped = set(), {}
    for f in sorted(files):
        with open(f) as fh:
            ORIGINAL[f] = fh.read()
    for f in sorted(files):
        stripped[f] = strip_test_items(f, blank_strings_and_comments(ORIGINAL[f]), excluded)
    counts = {name: {} for name in CATEGORIES}
    for f in sorted(files):
        if f in excluded:
            continue
        crate = f.split(os.sep)[0]
        for lineno, line in enumerate(stripped[f].splitlines(), 1):
            for name, pattern in CATEGORIES.items():
                hits = len(pattern.findall(line))
                if name == "assert! (run time)" and re.match(r"\s*const\s+_", line):
                    hits = 0
                if hits:
                    counts[name][crate] = counts[name].get(crate, 0) + hits
                    if listing == name:
                        print(f"{f}:{lineno}: {ORIGINAL[f].splitlines()[lineno - 1].strip()}")
    if listing:
        return
    crates = sorted({f.split(os.sep)[0] for f in files})
    print("| category | " + " | ".join(crates) + " | total |")
    print("|---|" + "---:|" * (len(crates) + 1))
    for name in CATEGORIES:
        row = [counts[name].get(c, 0) for c in crates]
        print(f"| `{name}` | " + " | ".join(map(str, row)) + f" | {sum(row)} |")
    print(f"\n{len(files) - len(excluded & set(files))} non-test files of {len(files)}")


if __name__ == "__main__":
    main(sys.argv)
