"""Mutation check: plant realistic one-line bugs, one at a time, and make sure the fast tests
catch every one.

Each mutation replaces one exact snippet of a source file (it must occur exactly once; a
snippet that no longer matches is an ERROR, never a pass, so an edit of the code cannot silently
retire a mutation: update the snippet instead). Mutations are planted in a scratch copy of the
working tree (tracked and untracked, not ignored files), never in place; the listed fast tests
run there with the project venv; a mutation whose tests all pass SURVIVED.

    python scripts/mutation_check.py            # all mutations (make mutation)
    python scripts/mutation_check.py --check    # only check that every snippet still matches
    python scripts/mutation_check.py --only tse-least-attended ccd-gmm-high-mean
    python scripts/mutation_check.py --list

Exit status: 0 when every mutation was caught, 1 when one survived or could not be planted.
"""
from __future__ import annotations

import argparse
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = "not slow and not vllm and not llamafactory and not gpu"


@dataclass(frozen=True)
class Mutation:
    id: str
    path: str        # relative to the repository root
    old: str         # exact snippet, must occur exactly once
    new: str
    tests: tuple     # pytest targets (files or node ids), fast ones
    why: str         # what a researcher would lose


M = Mutation
PINNED = "tests/test_pinned.py"
P_TRAIN = f"{PINNED}::test_loss_reaching_backward_is_ccd_weighted_and_rda_times_gamma"
P_GRAD = f"{PINNED}::test_noisy_pair_moves_no_gradient"
P_TSE = (f"{PINNED}::test_visual_tse_keeps_the_top_ratio_patches_by_cls_attention",
         f"{PINNED}::test_text_tse_keeps_the_top_ratio_words_by_eot_attention")
P_MEAN = (f"{PINNED}::test_retrieval_uses_the_mean_of_bge_and_tse", f"{PINNED}::test_thi_scorer_uses_the_mean_of_bge_and_tse")
THI_GATING = tuple(f"tests/test_thi.py::{t}" for t in (
    "test_gating_unit_functions", "test_gating_follows_algorithm_1_case_by_case",
    "test_queries_asked_per_round_needed_scheme", "test_single_round_asks_only_confident_queries"))
THI_EQ6 = tuple(f"tests/test_thi.py::{t}" for t in (
    "test_eq6_on_known_inputs", "test_run_thi_applies_eq6_only_to_refined_queries"))
MUTATIONS: list[Mutation] = [
    # ---------------------------------------------------------------- metrics
    M("metrics-r1-off-by-one", "utils/metrics.py", "np.count_nonzero(first < 1)", "np.count_nonzero(first <= 1)",
      ("tests/test_metrics.py",), "R1 counts rank 2 as a hit: every table's R1 inflated"),
    M("metrics-ties-favour-correct", "utils/metrics.py", "np.count_nonzero(row[:g] >= row[g])",
      "np.count_nonzero(row[:g] > row[g])", ("tests/test_metrics.py",),
      "ties ranked in favour of the correct image: degenerate models look good"),
    M("metrics-map-ignores-hit-number", "utils/metrics.py", "weights=hit_no / (ranks + 1.0)",
      "weights=1.0 / (ranks + 1.0)", ("tests/test_metrics.py",), "mAP becomes mean reciprocal rank"),
    M("metrics-minp-ignores-count", "utils/metrics.py", "(num_rel[valid] / (last + 1.0))", "(1.0 / (last + 1.0))",
      ("tests/test_metrics.py",), "mINP wrong for queries with several correct images"),
    # ---------------------------------------------------------------- losses
    M("tal-one-direction", "model/objectives.py",
      "return _tal_direction(scores, pos, tau, margin) + _tal_direction(scores.t(), pos, tau, margin)",
      "return 2 * _tal_direction(scores, pos, tau, margin)", ("tests/test_objectives.py", P_GRAD),
      "TAL trains text-to-image only"),
    M("tal-margin-sign", "model/objectives.py", "- _weighted_positive(sim, pos, tau) + margin).clamp(min=0)",
      "- _weighted_positive(sim, pos, tau) - margin).clamp(min=0)", ("tests/test_objectives.py", P_GRAD),
      "TAL's margin subtracted"),
    M("infonce-one-direction", "model/objectives.py", "return (t2i + i2t) / 2", "return t2i",
      ("tests/test_objectives.py",), "InfoNCE without the image-to-text half"),
    M("trl-easiest-negative", "model/objectives.py", "hardest = sim.masked_fill(~neg, float(\"-inf\")).max(1).values",
      "hardest = sim.masked_fill(~neg, float(\"inf\")).min(1).values", ("tests/test_objectives.py",),
      "TRL uses the easiest negative"),
    M("positives-by-index-not-pid", "model/objectives.py", "return pids.unsqueeze(0) == pids.unsqueeze(1)",
      "return torch.eye(pids.shape[0], dtype=torch.bool, device=pids.device)",
      ("tests/test_objectives.py", P_GRAD), "same-identity pairs treated as negatives"),
    # ---------------------------------------------------------------- TSE
    M("tse-visual-least-attended", "model/tse.py",
      "scores[:, 0] = -1.0  # never select the CLS token itself\n        idx = scores.topk(k, dim=-1).indices",
      "scores[:, 0] = -1.0  # never select the CLS token itself\n        idx = (-scores).topk(k, dim=-1).indices",
      P_TSE, "TSE pools the least-attended patches"),
    M("tse-visual-attention-to-cls", "model/tse.py", "scores = attn[:, 0, :].clone()",
      "scores = attn[:, :, 0].clone()", P_TSE, "TSE reads the attention column (to CLS), not CLS's row"),
    M("tse-visual-cls-selectable", "model/tse.py", "        scores[:, 0] = -1.0  # never select the CLS token itself\n",
      "", P_TSE, "TSE may pick the CLS token itself"),
    M("tse-visual-mean-pool", "model/tse.py", "return feats.amax(dim=1).float()", "return feats.mean(dim=1).float()",
      P_TSE, "TSE mean-pools instead of max-pooling"),
    M("tse-text-least-attended", "model/tse.py",
      "scores = scores.masked_fill(~word, -1.0)\n        idx = scores.topk(k, dim=-1).indices",
      "scores = scores.masked_fill(~word, -1.0)\n        idx = (-scores).topk(k, dim=-1).indices",
      P_TSE, "text TSE pools the least-attended words"),
    M("tse-text-sot-row", "model/tse.py", "scores = attn[rows, eot, :].clone()", "scores = attn[rows, 0, :].clone()",
      P_TSE, "text TSE ranks words by SOT's attention"),
    M("tse-text-sot-selectable", "model/tse.py", "        word[:, 0] = False\n", "",
      P_TSE, "text TSE may pick SOT"),
    # ---------------------------------------------------------------- RDE, retrieval
    M("rda-term-without-gamma", "model/rde.py", "out[name] = loss * aug_gamma if name in RDA_TERMS else loss",
      "out[name] = loss", (P_GRAD,), "the RDA term at full weight all training long"),
    M("rda-gamma-min-for-max", "processor/rda_schedule.py", "return max(float(cfg.rda_gamma_min)",
      "return min(float(cfg.rda_gamma_min)", (P_TRAIN,),
      "the RDA weight stuck at its floor"),
    M("ccd-weights-not-applied", "model/rde.py", "total = (w_local * per_local).sum()", "total = per_local.sum()",
      (P_GRAD,), "CCD's labels never reach the loss: no defence against noisy pairs"),
    M("retrieval-bge-only", "model/features.py", "return sum(q[k] @ g[k].t() for k in names) / len(names)",
      "return q[\"bge\"] @ g[\"bge\"].t()", P_MEAN, "retrieval ignores TSE (paper's numbers unreachable)"),
    M("evaluate-bge-only", "processor/evaluate.py", "sim = similarity_from_features(q_feats, g_feats)",
      "sim = q_feats[\"bge\"] @ g_feats[\"bge\"].t()", P_MEAN, "evaluation ranks by BGE alone"),
    M("thi-scorer-bge-only", "thi/scoring.py", "for k in (\"bge\", \"tse\") if k in gallery_feats}",
      "for k in (\"bge\",) if k in gallery_feats}", P_MEAN,
      "THI re-encodes refined queries with BGE only: S_bar on another scale than S"),
    M("text-bge-at-sot", "model/rde.py",
      "bge = tokens[torch.arange(tokens.shape[0], device=tokens.device), ids.argmax(dim=-1)].float()",
      "bge = tokens[:, 0].float()", (f"{PINNED}::test_text_bge_is_read_at_the_eot_token",), "text embedding read at SOT: every caption alike"),
    # ---------------------------------------------------------------- CCD
    M("ccd-gmm-high-mean", "processor/ccd.py", "[:, int(np.argmin(gmm.means_.ravel()))]",
      "[:, int(np.argmax(gmm.means_.ravel()))]", ("tests/test_ccd.py",), "CCD trusts the noisy pairs"),
    M("ccd-disagreement-kept", "processor/ccd.py", "weights[disagree] = coins.astype(np.float32)",
      "weights[disagree] = 1.0", ("tests/test_ccd.py",), "disagreeing views always trusted"),
    M("ccd-one-percent-rule-off", "processor/ccd.py", "if prob.size and prob.min() > threshold:",
      "if False:", ("tests/test_ccd.py",), "no pair ever noisy when the GMM finds none"),
    M("ccd-threshold-inclusive", "processor/ccd.py", "return (prob > threshold).astype(np.int64)",
      "return (prob >= threshold).astype(np.int64)", ("tests/test_ccd.py",), "the 1% rule marks nothing"),
    # ---------------------------------------------------------------- training loop
    M("train-ignores-ccd-weights", "processor/trainer.py", "losses = net(batch, weights=w, aug_gamma=gamma)",
      "losses = net(batch, aug_gamma=gamma)", (P_TRAIN,), "RDE's whole defence against noisy pairs is off"),
    M("train-weights-misindexed", "processor/trainer.py", "w = weights[batch[\"index\"].cpu().long()].to(device)",
      "w = weights[:batch[\"index\"].shape[0]].to(device)", (P_TRAIN,),
      "each batch gets the first pairs' CCD weights"),
    M("train-gamma-epoch-0", "processor/trainer.py", "gamma = rda_gamma(epoch, cfg)",
      "gamma = rda_gamma(0, cfg)", (P_TRAIN,), "the RDA weight never decays"),
    M("train-best-by-lower-r1", "processor/trainer.py", "if r1 > history.best_r1:", "if r1 < history.best_r1:",
      ("tests/test_train.py::test_resume_is_bit_identical",), "best.pth never written / wrong epoch"),
    # ---------------------------------------------------------------- the paper's recipe (docs/DEVIATIONS.md)
    M("recipe-bias-rule-after-tse", "solver/__init__.py",
      "        lr = cfg.emb_lr if cfg.emb_lr is not None else cfg.lr * cfg.lr_factor\n    if TEXT_POS_EMBED",
      "        lr = cfg.emb_lr if cfg.emb_lr is not None else cfg.lr * cfg.lr_factor\n    if \"bias\" in name:\n"
      "        lr = cfg.lr * cfg.bias_lr_factor\n    if TEXT_POS_EMBED", ("tests/test_recipe.py",), "TSE biases at 2e-5, not the release's 1e-3"),
    M("recipe-no-text-pos-lr", "solver/__init__.py", "and int(cfg.text_length) != 77", "and False", ("tests/test_recipe.py",),
      "UFine6926's 168-token position table trains at 1e-5"),
    M("recipe-pre-skips-always", "model/__init__.py",
      "                load[key] = resize_text_pos_embed(value, own[key].shape[0])", "                pass", ("tests/test_recipe.py",),
      "+pre drops the checkpoint's text positions"),
    M("recipe-rda-not-required", "processor/trainer.py", "    rda_file = require_rda_file(cfg)", "    rda_file = None",
      ("tests/test_recipe.py",), "an ICL config silently trains plain RDE"),
    M("recipe-train-mode-ignored", "processor/trainer.py", "net.train(cfg.train_mode == \"train\")", "net.train()",
      ("tests/test_recipe.py",), "release_icl updates BatchNorm statistics"),
    M("recipe-ccd-pass-ignored", "processor/ccd_epoch.py", "    if cfg.ccd_loss_pass == \"train_loader\":", "    if False:",
      ("tests/test_recipe.py",), "the paper configs' CCD pass is the test transform"),
    # ---------------------------------------------------------------- RDA data
    M("rda-view-is-original", "datasets/bases.py", "aug_caption = draw_rda_caption(self.rda[index], rng)",
      "aug_caption = caption", ("tests/test_loaders.py",), "the RDA view is the original caption"),
    M("rda-first-alternative-only", "datasets/bases.py",
      "return \" \".join(rng.choice(sub_sentences[i]) for i in order)",
      "return \" \".join(sub_sentences[i][0] for i in order)", ("tests/test_loaders.py",),
      "RDA never uses the rewrites"),
    M("rda-not-moved-with-noise", "datasets/build.py", "        rda = permute_captions(rda, index)\n",
      "        rda = list(rda)\n",
      ("tests/test_loaders.py",), "noisy pairs keep their image's true RDA sub-sentences"),
    # ---------------------------------------------------------------- THI gating, Eq. 6
    M("gating-round0-ignores-xi", "thi/gating.py", "return yes & fresh & confident", "return yes & fresh",
      THI_GATING, "unconfident queries anchored at round 0"),
    M("gating-later-rounds-ignore-xi", "thi/gating.py", "return yes & fresh & ~confident", "return yes & fresh",
      THI_GATING, "confident queries re-anchored in later rounds"),
    M("gating-xi-inclusive", "thi/gating.py", "confident = np.asarray(top1) > xi", "confident = np.asarray(top1) >= xi",
      THI_GATING, "top1 == xi counted as confident"),
    M("eq6-anchor-not-one", "thi/rerank.py", "    s_bar[np.arange(len(anchor_cols)), anchor_cols] = 1.0\n", "",
      THI_EQ6, "the confirmed anchor is not pinned to 1"),
    M("eq6-lambda-swapped", "thi/rerank.py", "return (lam * base_rows + (1.0 - lam) * s_bar)",
      "return ((1.0 - lam) * base_rows + lam * s_bar)", THI_EQ6, "lambda weights the wrong term"),
    # ---------------------------------------------------------------- MLLM answer parsing
    M("parse-yes-no-unparseable-is-no", "utils/mllm/parsing.py",
      "return True if word == \"yes\" else False if word == \"no\" else None", "return word == \"yes\"",
      ("tests/test_mllm_parsing.py",), "unparseable answers counted as No, not as failures"),
    M("parse-vqa-question-off-by-one", "utils/mllm/parsing.py",
      "question = VQA_QUESTIONS[number - 1] if 1 <= number <= len(VQA_QUESTIONS) else None",
      "question = VQA_QUESTIONS[number] if 0 <= number < len(VQA_QUESTIONS) else None",
      ("tests/test_mllm_parsing.py",), "answers cleaned against the wrong question"),
    # ---------------------------------------------------------------- MLLM stage runner
    M("stage-vqa-gibberish-usable", "utils/mllm/stages.py",
      "return looks_like_vqa_reply(parse_vqa(answer))", "return bool(parse_vqa(answer))",
      ("tests/test_mllm_core.py",), "letter salad from a broken server becomes THI's refined query"),
    M("stage-cached-counted-as-fresh", "utils/mllm/stages.py",
      "counts.cached += len(chunk) - fresh", "counts.cached += fresh",
      ("tests/test_mllm_core.py",), "cache hits reported as model calls"),
    M("rda-vqa-keyed-by-path", "rda/generate.py",
      "return {rel: image_digest(self._image_path(rel)) for rel in images}",
      "return {rel: rel for rel in images}",
      ("tests/test_rda.py",), "changed images reuse answers about the old pixels"),
    # ---------------------------------------------------------------- tokenizer
    M("tokenizer-truncation-drops-eot", "utils/tokenizer.py", "tokens = tokens[: text_length - 1] + [EOT_ID]",
      "tokens = tokens[:text_length]", ("tests/test_tokenizer.py",), "long captions lose EOT: features read at a word"),
    M("tokenizer-no-sot", "utils/tokenizer.py", "tokens = [SOT_ID] + get_tokenizer().encode(caption) + [EOT_ID]",
      "tokens = get_tokenizer().encode(caption) + [EOT_ID]", ("tests/test_tokenizer.py",),
      "ids differ from CLIP's: pretrained text encoder mismatched"),
    # ---------------------------------------------------------------- readers
    M("reader-first-test-caption-only", "datasets/annotations.py",
      "for caption in record[\"captions\"]:\n                split[\"caption_pids\"].append(pid)",
      "for caption in record[\"captions\"][:1]:\n                split[\"caption_pids\"].append(pid)",
      ("tests/test_datasets.py",), "half the test queries silently dropped"),
    M("reader-first-train-caption-only", "datasets/annotations.py",
      "for k, caption in enumerate(record[\"captions\"]):\n                train.append(",
      "for k, caption in enumerate(record[\"captions\"][:1]):\n                train.append(", ("tests/test_datasets.py",),
      "half the training captions silently dropped"),
    M("reader-gallery-duplicates-kept", "datasets/annotations.py", "        if split == \"train\":\n            logger.warning(",
      "        if split != \"val\":\n            logger.warning(", ("tests/test_inputs.py",),
      "a test image listed twice enters the gallery twice and moves every metric"),
    M("image-16bit-clipped", "utils/images.py", "    if image.mode in _HIGH_BIT:", "    if False:",
      ("tests/test_inputs.py",), "16-bit PNGs read as all-white images"),
    M("config-select-ratio-zero-accepted", "utils/config.py", "\"select_ratio\": (0, False, 1, True)",
      "\"select_ratio\": (0, True, 1, True)", ("tests/test_inputs.py",),
      "select_ratio 0 selects no tokens: TSE trains on nothing"),
    M("transforms-mean-std-swapped", "datasets/transforms.py", "T.Normalize(mean=CLIP_MEAN, std=CLIP_STD)",
      "T.Normalize(mean=CLIP_STD, std=CLIP_MEAN)", ("tests/test_datasets.py",),
      "images normalised unlike CLIP's pretraining"),
    # ---------------------------------------------------------------- noise injection
    M("noise-selected-not-shuffled", "datasets/noise.py", "index[selected] = rng.permutation(selected)",
      "index[selected] = selected", ("tests/test_datasets.py", "tests/test_loaders.py"),
      "noisy_rate has no effect: every noisy-correspondence table measured on clean data"),
    M("noise-release-file-missing-drawn", "datasets/noise.py", "    if not draw:\n        raise NoiseFileError(",
      "    if False:\n        raise NoiseFileError(", ("tests/test_datasets.py", "tests/test_recipe.py"),
      "a missing release noise file silently replaced by a new permutation"),
    M("sync-bn-local-stats", "processor/sync_bn.py", "stats = all_reduce(stats.float())",
      "stats = stats.float()", ("tests/test_train.py",),
      "DDP BatchNorm statistics from each GPU's share of the batch"),
    M("noise-mask-inverted", "datasets/build.py", "noisy_mask = index != np.arange(len(train))",
      "noisy_mask = index == np.arange(len(train))", ("tests/test_loaders.py",),
      "CCD precision/recall reported against the clean pairs"),
    M("noise-captions-not-moved", "datasets/build.py",
      "captions = permute_captions([item[3] for item in train], index)",
      "captions = [item[3] for item in train]", ("tests/test_loaders.py",),
      "training data clean although noise is reported"),
    # ---------------------------------------------------------------- the mini paper's evidence
    M("repro-verdict-ignores-interval", "repro/stats.py", "    if lo <= 0.0 <= hi:\n",
      "    if lo == hi == 0.0:\n", ("tests/test_repro.py::test_verdict_only_with_an_interval_that_excludes_zero",),
      "an effect whose interval includes 0 is called the paper's direction"),
    M("repro-verdict-ignores-paper-sign", "repro/stats.py", "return \"paper's direction\" if (lo > 0) == (paper > 0)",
      "return \"paper's direction\" if lo > 0", ("tests/test_repro.py::test_verdict_only_with_an_interval_that_excludes_zero",),
      "a shown effect against the paper's sign is reported as agreeing"),
    M("repro-cache-ignores-config", "repro/jobs.py", "        if rec.get(\"identity\") != self.key():\n",
      "        if False:\n", ("tests/test_repro.py::test_a_result_made_by_another_config_is_not_reused",),
      "a result made by another configuration is reused as [cached]"),
    M("simulated-profile-loc-ignores-truth", "offline/simulated.py",
      "p = self.profile[\"loc_yes_true\" if match else \"loc_yes_false\"]", "p = self.profile[\"loc_yes_true\"]",
      ("tests/test_mllm_simulated.py::test_error_profile_answers_at_the_measured_rates_deterministically",),
      "the calibrated MLLM says Yes as often to wrong pairs as to right ones"),
    M("simulated-concise-no-budget", "offline/simulated.py", "            if n <= budget:\n",
      "            if True:\n", ("tests/test_mllm_simulated.py::test_concise_aggregation_stays_within_the_text_length",),
      "the concise aggregation ignores the text length"),
    # ---------------------------------------------------------------- memory plan, preflight
    M("memory-adam-one-moment", "processor/memory.py", "return ModelState(weights=weights, gradients=weights, adam=2 * weights,",
      "return ModelState(weights=weights, gradients=weights, adam=weights,", ("tests/test_memory_plan.py",),
      "the plan counts one Adam moment: a GPU that looks big enough runs out of memory"),
    M("memory-saved-counted-per-tensor", "processor/memory.py", "seen[ptr] = max(seen.get(ptr, 0), nbytes)",
      "seen[ptr] = seen.get(ptr, 0) + nbytes", ("tests/test_memory_plan.py",),
      "a storage saved twice is counted twice: activations overestimated"),
    M("preflight-clip-hash-ignored", "repro/preflight.py", "    if got != CLIP_SHA256:", "    if False:",
      ("tests/test_preflight.py",), "a truncated or wrong CLIP download passes preflight"),
    M("preflight-split-sizes-ignored", "repro/preflight.py", "        ok = tuple(got) == tuple(want)",
      "        ok = True", ("tests/test_preflight.py",), "an annotation with other splits passes preflight"),
    # ---------------------------------------------------------------- the search page (issue 27)
    M("app-pixels-checked-after-decode", "thi/app/server.py", "        width, height = image.size\n",
      "        width, height = image.size\n        image.load()\n",
      ("tests/test_app.py::test_a_pixel_bomb_is_refused_from_its_header_before_decoding",),
      "a one-colour PNG of 13000x13000 is decoded (about 2 GB per request) before it is refused"),
    M("app-referer-unchecked", "thi/app/access.py", 'for name in ("origin", "referer"):',
      'for name in ("origin",):', ("tests/test_app.py::test_only_our_host_and_same_origin_posts_are_served",),
      "a cross-site form post without Origin drives the API"),
    M("app-token-missing-accepted", "thi/app/access.py", "if given is None or not secrets",
      "if given is not None and not secrets",
      ("tests/test_app.py::test_beyond_loopback_a_token_is_required_and_paths_are_relative",),
      "a server bound to 0.0.0.0 answers anyone without its token"),
    M("app-history-unbounded", "thi/app/server.py", "session.rounds[-HISTORY_SHOWN:]", "session.rounds",
      ("tests/test_app.py::test_rounds_per_session_and_the_history_a_response_carries_are_bounded",),
      "every response carries the whole history: latency grows with each answer"),
]


def _files_to_copy() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                         capture_output=True).stdout.decode()
    return [p for p in out.split("\0") if p and os.path.isfile(os.path.join(ROOT, p))]


def scratch_copy(dest: str) -> None:
    """The working tree (tracked + untracked, not ignored) under ``dest``."""
    for rel in _files_to_copy():
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), target)


def check_patterns(mutations: list[Mutation], root: str = ROOT) -> list[str]:
    """Problems: snippets that do not occur exactly once, unknown test files, duplicate ids."""
    problems = []
    ids = [m.id for m in mutations]
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(f"{dup}: duplicate mutation id")
    for m in mutations:
        path = os.path.join(root, m.path)
        if not os.path.isfile(path):
            problems.append(f"{m.id}: {m.path} does not exist")
            continue
        count = open(path, encoding="utf-8").read().count(m.old)
        if count != 1:
            problems.append(f"{m.id}: the snippet occurs {count} times in {m.path} (must be exactly once); "
                            f"update it in scripts/mutation_check.py: {m.old!r}")
        for t in m.tests:
            file, _, func = t.partition("::")
            if not os.path.isfile(os.path.join(root, file)):
                problems.append(f"{m.id}: test target {t} does not exist")
            elif func and f"def {func.split('[')[0]}(" not in open(os.path.join(root, file), encoding="utf-8").read():
                problems.append(f"{m.id}: test target {t}: no such test in {file}")
    return problems


def run_tests(copy: str, tests: tuple, timeout: int) -> tuple[int, str]:
    python = os.path.join(ROOT, ".venv", "bin", "python")
    if not os.path.exists(python):
        python = sys.executable
    cmd = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", FAST, *tests]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    # one thread per test run: with several runs side by side (--jobs) or a busy machine,
    # OpenMP threads that spin-wait for each other cost far more than they bring
    env.setdefault("OMP_NUM_THREADS", "1")
    try:
        proc = subprocess.run(cmd, cwd=copy, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return -1, "timeout"
    return proc.returncode, (proc.stdout + proc.stderr)[-2000:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only check that every snippet matches exactly once")
    ap.add_argument("--list", action="store_true", help="list the mutations")
    ap.add_argument("--only", nargs="+", metavar="ID", help="run only these mutations")
    ap.add_argument("--jobs", type=int, default=1, help="mutations tested side by side (one scratch copy each)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per mutation's test run")
    args = ap.parse_args(argv)
    mutations = MUTATIONS
    if args.only:
        unknown = set(args.only) - {m.id for m in MUTATIONS}
        if unknown:
            ap.error(f"unknown mutation id(s): {', '.join(sorted(unknown))}")
        mutations = [m for m in MUTATIONS if m.id in args.only]
    if args.list:
        for m in mutations:
            print(f"{m.id:36s} {m.path:28s} {m.why}")
        return 0
    problems = check_patterns(mutations)
    if problems:
        print("ERROR: mutations that cannot be planted:\n  " + "\n  ".join(problems))
        if args.check:
            return 1
    elif args.check:
        print(f"all {len(mutations)} mutation snippets match exactly once")
        return 0

    start = time.time()
    broken = {p.split(":")[0] for p in problems}
    results: dict[str, str] = {m.id: "ERROR" for m in mutations if m.id in broken}
    todo = [m for m in mutations if m.id not in results]
    jobs = max(1, min(args.jobs, len(todo)))
    with tempfile.TemporaryDirectory(prefix="icl-mutation-") as tmp:
        copies = [os.path.join(tmp, f"repo{j}") for j in range(jobs)]
        for copy in copies:
            scratch_copy(copy)
        targets = tuple(sorted({t for m in mutations for t in m.tests}))
        print(f"[mutation] baseline: {len(targets)} test targets on the unmutated copy ...", flush=True)
        rc, tail = run_tests(copies[0], targets, args.timeout * 3)
        if rc != 0:
            print(f"ERROR: the tests fail without any mutation (exit {rc}):\n{tail}")
            return 1
        free = queue.Queue()
        for copy in copies:
            free.put(copy)
        lock = threading.Lock()
        done = [0]

        def plant_and_test(m: Mutation) -> None:
            copy = free.get()
            try:
                path = os.path.join(copy, m.path)
                original = open(path, encoding="utf-8").read()
                with open(path, "w", encoding="utf-8") as f:
                    f.write(original.replace(m.old, m.new, 1))
                t0 = time.time()
                try:
                    rc, tail = run_tests(copy, m.tests, args.timeout)
                finally:
                    with open(path, "w", encoding="utf-8") as f:
                        f.write(original)
            finally:
                free.put(copy)
            # 1: tests failed (caught); 0: all passed (survived); else: could not judge.
            verdict = {0: "SURVIVED", 1: "caught"}.get(rc, f"ERROR (pytest exit {rc})")
            with lock:
                results[m.id] = verdict
                done[0] += 1
                print(f"[mutation] {done[0]:2d}/{len(todo)} {verdict:9s} {m.id} ({time.time() - t0:.0f} s)",
                      flush=True)
                if rc not in (0, 1):
                    print(tail)

        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(plant_and_test, todo))
    caught = sum(v == "caught" for v in results.values())
    bad = {k: v for k, v in results.items() if v != "caught"}
    print(f"\n[mutation] score {caught}/{len(mutations)} caught in {time.time() - start:.0f} s")
    for k, v in bad.items():
        m = next(x for x in mutations if x.id == k)
        print(f"  {v}: {k} ({m.path}): {m.why}")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
