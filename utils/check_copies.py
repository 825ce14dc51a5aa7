#!/usr/bin/env python
# Copyright 2026 The InPO for diffusers authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Keep the marked copies in train_inpo_sdxl.py and train_inpo_sd3.py identical to their originals in train_inpo.py.

A function, class or constant of those scripts that is the same as one of train_inpo.py stands below a line

    # Copied from train_inpo.<name>
    # Copied from train_inpo.<name> with old->new[, old2->new2]

(diffusers' convention). `with` replaces each `old` by `new` in the original's text before the comparison. This
script lists the copies that drifted from their originals and exits with status 1; `--fix` rewrites them from the
originals instead.

    python utils/check_copies.py          # check
    python utils/check_copies.py --fix    # rewrite drifted copies
"""

import argparse
import ast
import os
import re
import sys


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORIGINAL_FILE = "train_inpo.py"
COPY_FILES = ("train_inpo_sdxl.py", "train_inpo_sd3.py")
MARKER = re.compile(r"^# Copied from train_inpo\.(?P<name>\w+)(?: with (?P<replace>.+))?\s*$")


def top_level_spans(source):
    """{name: (first line, last line)} (0-based, inclusive, decorators included) of top-level definitions."""
    spans = {}
    for node in ast.parse(source).body:
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            spans[node.name] = (start, node.end_lineno - 1)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    spans[target.id] = (start, node.end_lineno - 1)
    return spans


def parse_replacements(text):
    """'a->b, c->d' → [('a', 'b'), ('c', 'd')]."""
    if not text:
        return []
    pairs = []
    for part in text.split(","):
        if "->" not in part:
            raise ValueError(f"Bad replacement {part.strip()!r}: write old->new.")
        old, new = part.split("->", 1)
        pairs.append((old.strip(), new.strip()))
    return pairs


def check_file(path, original_lines, original_spans, fix=False):
    """Problems of the marked copies in `path` (rewritten from the originals when `fix`)."""
    with open(path) as f:
        lines = f.read().split("\n")
    copy_starts = dict(top_level_spans("\n".join(lines)).values())
    problems, rewrites = [], []
    for index, line in enumerate(lines):
        match = MARKER.match(line)
        if not match:
            continue
        name, where = match["name"], f"{os.path.basename(path)}:{index + 1}"
        if name not in original_spans:
            problems.append(f"{where}: train_inpo.py has no top-level {name!r}")
            continue
        if index + 1 not in copy_starts:
            problems.append(f"{where}: the marker for {name!r} is not followed by a definition")
            continue
        start, end = original_spans[name]
        expected = "\n".join(original_lines[start : end + 1])
        for old, new in parse_replacements(match["replace"]):
            expected = expected.replace(old, new)
        actual = "\n".join(lines[index + 1 : copy_starts[index + 1] + 1])
        if actual != expected:
            problems.append(f"{where}: the copy of train_inpo.{name} differs from its original")
            rewrites.append((index + 1, copy_starts[index + 1], expected.split("\n")))
    if fix and rewrites:
        for start, end, new_lines in sorted(rewrites, reverse=True):
            lines[start : end + 1] = new_lines
        with open(path, "w") as f:
            f.write("\n".join(lines))
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fix", action="store_true", help="Rewrite drifted copies from their originals.")
    parser.add_argument("--repo", default=REPO, help="The folder that holds the two scripts.")
    args = parser.parse_args(argv)
    with open(os.path.join(args.repo, ORIGINAL_FILE)) as f:
        original = f.read()
    original_spans = top_level_spans(original)
    problems = []
    for name in COPY_FILES:
        problems += check_file(os.path.join(args.repo, name), original.split("\n"), original_spans, fix=args.fix)
    if not problems:
        return 0
    if args.fix:
        print("Rewrote from train_inpo.py:\n  " + "\n  ".join(problems))
        unfixable = [p for p in problems if not p.endswith("differs from its original")]
        return 1 if unfixable else 0
    print("Marked copies out of date (run `python utils/check_copies.py --fix`):\n  " + "\n  ".join(problems))
    return 1


if __name__ == "__main__":
    sys.exit(main())
