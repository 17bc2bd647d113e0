"""The measurement code of this repository: benchmarks, their data, baselines, scorers and report renderers.

Not part of the installed ``peft_deltamem`` package (``pip install`` ships only ``src/peft_deltamem``): it lives
beside ``src/`` and is imported by ``scripts/*.py`` (which put the repository root on ``sys.path``) and by the tests
(pytest's ``pythonpath``), run from a checkout. It imports the library; the library never imports it.

- :mod:`benchmarks.synthetic`: the synthetic long-horizon memory task (episodes, word-level tokenizer);
  :mod:`benchmarks.bench_data`, :mod:`benchmarks.bench_train`, :mod:`benchmarks.bench_cost`,
  :mod:`benchmarks.benchmark` and :mod:`benchmarks.bench_report`: the memory benchmark of
  ``scripts/bench_memory.py`` (data, training, cost, the run, its report).
- :mod:`benchmarks.locomo` (loader, episode builder, scorer) and :mod:`benchmarks.locomo_runner`:
  ``scripts/eval_locomo.py``; :mod:`benchmarks.bm25`: the BM25 baseline; :mod:`benchmarks.extras`: the checks
  for the ``eval`` extra.
- :mod:`benchmarks.real_recall`: recall on SmolLM2 with the chat-facts task
  (:mod:`peft_deltamem.training.chat_facts`), its training loop (``scripts/train_real_memory.py``,
  ``scripts/bench_real_memory.py``).
- :mod:`benchmarks.open_facts` and :mod:`benchmarks.open_recall`: the open-vocabulary task and its scoring
  through the chat engine (``scripts/train_open_memory.py``, ``scripts/bench_open_memory.py``).
- :mod:`benchmarks.ttt`: the test-time-training baseline both real-model benchmarks run.
"""
