"""`ernielab data`: a corpus toolchain for any image folder, JSONL file or built-in world.

Each step reads a manifest (Parquet or JSONL, one row per image), adds its columns and writes it back
atomically; each can be run alone, resumes where an interruption left it, and shows a progress bar:

    scan -> dedupe -> categorize -> caption -> score -> sample

See docs/corpus.md. The steps are plain functions in `ernielab.corpus.steps`; the CLI is `ernielab.corpus.cli`.
"""
