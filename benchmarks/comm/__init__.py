"""Communication benchmark: what crosses codistillation groups, what it costs, and what it buys.

docs/design.md's communication targets, measured on the product itself (`codistill_ds.run.job.run`,
the function behind `codistill-ds train`, with DeepSpeed ZeRO-2 inside each group):

(a) bytes   Cross-group bytes per step for logit exchange, measured by the library's own
            counters (summary.json `cross_group_bytes`, per rank and per group) for both routes
            (leaders, rails) and several top-k sizes including the full vocabulary, checked
            exactly against `codistill_ds.plan.bytes.make_plan`; and the gradient all-reduce of
            synchronous data parallelism (`codistill.enabled=false`) on the same model, world
            and steps, measured by instrumenting the `torch.distributed` collectives DeepSpeed
            calls (ring model: all-reduce 2(W-1)/W x N per rank, all-gather (W-1) x N_in) next to
            the formula 2(W-1)/W x P x g. `codistill.mode=weights` (ZeRO-3) is tried through
            config validation first: measured against K(K-1) P w / I when it validates, reported
            as skipped with the library's message when it does not. The 1B-parameter figure
            comes from `codistill-ds plan --params 1B --json`.
(b) overhead  A group's step time with codistillation against the same group training alone,
            exchange-batch compute excluded. Every arm is 2 groups x 1 rank in one job (same
            processes, same CPU load): "alone" never exchanges after step 0 (interval 10^6),
            "exchange-sync" swaps logits every step and blocks on it (staleness 0), "exchange-
            async" posts every step and uses the peers' logits 2 steps later (staleness 2, async;
            "exchange-async-stale8": 8 steps later, more slack for a peer that falls behind).
            These arms use alpha 0, which removes the student forward on the exchange batch by
            configuration (the bytes on the wire are unchanged: alpha only weights the loss),
            and the teacher forward + compression of each step is the engine's own
            `exchange_compute_ms` in metrics.jsonl, subtracted per step. Arms alternate, in an order rotated every repeat, so load
            drift from other jobs hits all of them alike; the ratio is reported per repeat (each
            against the same repeat's alone arm), as the median of repeats (the headline) and
            pooled. One alpha-1 arm shows the raw step ratio with all exchange compute included.
            A second, same-moment estimate needs no separate arm: with interval 4 and staleness
            2 every 4-step cycle has an exchange-free step, which is the group training alone
            a few tens of ms away from the exchange steps, so bursts of load from other jobs
            hit both alike (see `overhead._interleaved`).
(c) twonode Two simulated nodes: two network namespaces joined by a veth pair capped with a
            token bucket (`tc ... tbf rate R burst 64kb latency 50ms` on both ends), 2 ranks per
            node, launched as a real 2-node job (`torchrun --nnodes 2 --node_rank i
            --master_addr 10.77.0.1` inside each namespace, `GLOO_SOCKET_IFNAME` = the veth).
            For each link rate: synchronous ZeRO-2 over all 4 ranks (one group) against 2-group
            codistillation with one group per node (ranks 0-1 on node 0, 2-3 on node 1). Wall
            clock is the sum of per-step `step_ms` (evaluation excluded, the same for both arms);
            the target is the synchronous arm's best validation loss at that rate. The veth's own
            byte counters give the bytes that really crossed the link in each arm. The full mode
            adds an (b) pair (alone, exchange-async-stale8) over the slowest link, one group per
            node.

    .venv/bin/python -m benchmarks.comm --out runs/comm-smoke --smoke   # ~30 s: the test's setting
    .venv/bin/python -m benchmarks.comm --out runs/comm-quick --quick   # ~6 minutes on 2 CPU cores
    .venv/bin/python -m benchmarks.comm --out runs/comm                 # ~10 minutes on 2 CPU cores

Run from the checkout root. One module per part: bytes.py, overhead.py, twonode.py (with
netns.py, the two namespaces), worker.py (the rank program), common.py (settings, launches, run
records); launching is `codistill_ds.distributed.launching`, shared with the tests.

Timing figures (b, c) are wall-clock on whatever else the machine runs: results.json and
results.md record the load average around each part, and (b) alternates its arms and reports
every repeat so a reader can judge the spread.

`--parts bytes,overhead,twonode` picks parts (default: all three; `--smoke` runs only `bytes`
unless told). The namespace part needs root and `ip netns`; without them it is skipped with the
reason in results.json. Output: OUT/results.json, OUT/results.md, OUT/comm_twonode.png, and
every run's own files under OUT/runs/. It exits non-zero if a launch fails or times out.
"""
