"""``python -m speclora_kernels.tools.gpu_check --out DIR [--budget SECONDS]``: one prepared
command that proves on a CUDA GPU what the CPU (the Triton interpreter) cannot.

Within ``--budget`` seconds (default 300, from a cold Triton cache), correctness first, then
runtime behaviour, then timings:

1. correctness: every method pattern x dtype (fp32 IEEE, fp32 TF32, fp16, bf16) x path
   (fused, split, segmented) x base (dense, NF4 with and without double quant) x dropout
   (0, 0.3) x M (1, 16, 17, 130, 512) x shape (N = 1, odd in_features, in_features not a
   multiple of the NF4 block), as an all-pairs covering design (``cases``), every output and
   gradient against float64 with NaN-poisoned outputs; a layer check per method
   (``AdapterLinear``); every autotune config of every kernel forced once;
2. the dropout mask read back from the kernels' outputs equals ``dropout_keep_mask``;
3. a training step in a CUDA graph, replayed (fresh masks, right gradients), and under
   ``torch.compile(mode="reduce-overhead")``;
4. autotuning: first-call cost of new sequence lengths, two threads on a cold cache, the
   deterministic choice in two fresh processes;
5. two devices (with 2+ GPUs);
6. the op test files under pytest on CUDA;
7. timings: ceilings, a streaming scan, and the registered timing pairs.

Modules: ``budget`` (the plan), ``cases`` (the covering design), ``pool`` (worker processes),
``correctness``, ``runtime``, ``tuning_checks``, ``timings`` (the checks), ``collect`` and
``report`` (the report), ``__main__`` (the command).
"""
