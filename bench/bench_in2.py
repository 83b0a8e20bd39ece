"""IN2 assembly rates against tokenizing the corpus, in the same run.

    python bench/bench_in2.py [--contexts 2000] [--context-tokens 8192] [--quick]

Corpus: docstrings of Python's standard library (read with ``ast`` from the running interpreter's
sources: offline, a few MB of English and code), cut into >= 128-token segments by the ``segment``
op's function, with the embedded model's tokenizer (SmolLM2; the tiny test tokenizer if it is not
cached). Printed, all in tokens per second of the same run:

* tokenizing the corpus once: one tokenizer call per text (the usual loop), and one batch call;
* the ``interleave`` op's previous text-level path (kept in tests/test_in2_idlevel.py as the reference
  its output is compared with), on ``--reference-contexts`` contexts: it is slow;
* the ``interleave`` op as it runs now, whole (its one batch tokenization of the pool included), and
  the assembly alone (``interleave_samples`` over ids tokenized beforehand);

for type 1 (one key segment per context) and multi-hop (every segment of a 2-8 segment text), with
context lengths drawn from ``context_tokens`` +- 6%. Ratios are against the faster of the two
tokenizer rates. Goal: assembly at >= 10x the tokenizer, both types.
"""

from __future__ import annotations

import argparse
import ast
import random
import sys
import sysconfig
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def stdlib_texts(max_chars: int) -> list[dict]:
    texts, total = [], 0
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if {"site-packages", "test", "tests", "idle_test"} & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 600:
                    texts.append({"id": f"{path.stem}:{getattr(node, 'name', 'module')}:{len(texts)}", "text": doc})
                    total += len(doc)
                    if total >= max_chars:
                        return texts
    return texts


def load_tokenizer():
    from transformers import AutoTokenizer

    from specdsl.modelcache.known import model_path

    path = model_path("smollm2-135m-instruct")
    if (path / "tokenizer.json").is_file():
        return "smollm2-135m-instruct", AutoTokenizer.from_pretrained(path)
    from tests.tinymodel import build_tokenizer

    return "tiny test tokenizer (SmolLM2 not cached)", build_tokenizer()


def rate(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds / 1000:9.0f}K tok/s"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, default=2000)
    ap.add_argument("--context-tokens", type=int, default=8192)
    ap.add_argument("--corpus-chars", type=int, default=3_000_000)
    ap.add_argument("--reference-contexts", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="200 contexts of ~4K tokens, a 1 MB corpus")
    args = ap.parse_args()
    if args.quick:
        args.contexts, args.context_tokens, args.corpus_chars, args.reference_contexts = 200, 4096, 1_000_000, 30

    from specdsl.contract.ops import RunContext
    from specdsl.designs.in2 import ContextText, interleave_samples, segment_text
    from specdsl.ops.designs import InterleaveOp, _decodes_concatenatively
    from tests.test_in2_idlevel import reference_interleave

    name, tok = load_tokenizer()
    texts = stdlib_texts(args.corpus_chars)

    t = time.perf_counter()
    per_text = [tok(x["text"], add_special_tokens=False)["input_ids"] for x in texts]
    tok_loop = time.perf_counter() - t
    t = time.perf_counter()
    tok([x["text"] for x in texts], add_special_tokens=False)
    tok_batch = time.perf_counter() - t
    corpus_tokens = sum(map(len, per_text))
    tokenizer_rate = corpus_tokens / min(tok_loop, tok_batch)

    count = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    pool, by_text = [], {}
    for x in texts:
        segs = segment_text(x["text"], count, min_tokens=128)
        by_text[x["id"]] = segs
        pool += [{"id": f"{x['id']}:{i}", "text_id": x["id"], "segment": s} for i, s in enumerate(segs)]
    rng = random.Random(0)
    type1 = [{"id": f"q{i}", "text_id": seg["text_id"], "segment": seg["segment"], "question": "What is said?",
              "answer": "This."} for i, seg in enumerate(rng.choices(pool, k=args.contexts))]
    multi_texts = [tid for tid, segs in by_text.items() if 2 <= len(segs) <= 8]
    multi = [{"id": f"m{i}", "text_id": tid, "segments": by_text[tid], "question": "What links them?",
              "answer": "That."} for i, tid in enumerate(rng.choices(multi_texts, k=args.contexts))]
    spread = args.context_tokens * 6 // 100
    params = {"min_tokens": args.context_tokens - spread, "max_tokens": args.context_tokens + spread}

    print(f"tokenizer: {name} (decoding concatenative: {_decodes_concatenatively(tok)})")
    print(f"corpus: {len(texts)} stdlib docstrings, {corpus_tokens:,} tokens, {len(pool):,} segments; "
          f"{args.contexts} contexts of {params['min_tokens']}-{params['max_tokens']} tokens per type")
    print(f"  tokenizing the corpus once, a call per text  {rate(corpus_tokens, tok_loop)}")
    print(f"  tokenizing the corpus once, one batch call   {rate(corpus_tokens, tok_batch)}   (baseline: the faster)")

    services = SimpleNamespace(tokenizer=lambda ref: tok, note=lambda node, text: None)
    sep_ids = tok("\n\n", add_special_tokens=False)["input_ids"]
    pool_ids = [tok(r["segment"], add_special_tokens=False)["input_ids"] for r in pool]
    ids_of = {r["segment"]: ids for r, ids in zip(pool, pool_ids)}
    for label, rows, extra in (("type 1", type1, {}), ("multi-hop", multi, {"key": "segments"})):
        p = {"from": "qa", "pool": "segs", "model": "m", **params, **extra}
        key_col = extra.get("key", "segment")

        t = time.perf_counter()
        ref = reference_interleave(tok, rows[: args.reference_contexts], pool, p, 0)
        ref_s = time.perf_counter() - t
        ref_tokens = sum(r["context_tokens"] for r in ref)

        ctx = RunContext(node_id="long", params=p, inputs={"from": rows, "pool": pool}, vars={}, seed=0,
                         services=services, artifact_dir=Path("."))
        t = time.perf_counter()
        out = InterleaveOp().run(ctx)
        op_s = time.perf_counter() - t
        op_tokens = sum(r["context_tokens"] for r in out)

        def keys_ids(row):
            keys = row[key_col] if isinstance(row[key_col], list) else [row[key_col]]
            return [ids_of[k] for k in keys]

        text = ContextText(tok.decode, sep_ids, concatenative=_decodes_concatenatively(tok),
                           special_ids=frozenset(tok.all_special_ids))
        t = time.perf_counter()
        samples, _ = interleave_samples(rows, pool_ids, [r["text_id"] for r in pool], keys_ids, text,
                                        question="question", answer="answer", chat=True, short_ratio=0,
                                        min_tokens=params["min_tokens"], max_tokens=params["max_tokens"],
                                        rng=random.Random(0), on_error=lambda row, exc: exc)
        asm_s = time.perf_counter() - t
        asm_tokens = sum(r["context_tokens"] for r in samples)
        assert out[: len(ref)] == ref, "the op's rows differ from the reference path's"

        print(f"{label}:")
        print(f"  text-level path (before), {len(ref)} contexts {rate(ref_tokens, ref_s)}  "
              f"{ref_tokens / ref_s / tokenizer_rate:6.2f}x the tokenizer")
        print(f"  interleave op, whole, {len(out)} contexts   {rate(op_tokens, op_s)}  "
              f"{op_tokens / op_s / tokenizer_rate:6.2f}x the tokenizer")
        print(f"  assembly from ids alone, {len(samples)} contexts{rate(asm_tokens, asm_s)}  "
              f"{asm_tokens / asm_s / tokenizer_rate:6.2f}x the tokenizer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
