"""The two worlds a table can be reproduced in, behind one interface.

``RealWorld``: the benchmarks under ``--root``, the paper's configs (``configs/rde_<ds>.yaml``,
``configs/icl_<ds>.yaml``), Qwen2-VL through vLLM or an OpenAI-compatible server.
``MiniWorld``: SynthPEDES domains standing in for the benchmarks, the tiny pre-trained CLIP and
the simulated MLLM; every knob comes from a YAML (``configs/repro_mini.yaml``).

Both turn "train METHOD on DATASET", "evaluate RUN on TARGET", "THI on RUN/TARGET" into jobs
(commands plus the file that marks them finished) and name the folders they write.
"""
from __future__ import annotations

import os
import shlex
from typing import Optional

import yaml

from utils import run_dir as rd
from thi import defaults as thi_defaults

from . import results
from .jobs import Job, Lazy, digest, file_digest, py

from datasets.noise import release_noise_name
from utils.pre_checkpoints import PRE_CHECKPOINT_FILES, PRE_SOURCE, pre_checkpoint, pre_tag
import numpy as np

# What each method of the tables is, on top of the dataset's config. CLIP and IRRA are the
# RDE architecture trained with their losses (InfoNCE; SDM) and no CCD: stand-ins for the
# fine-tuned CLIP and the IRRA model of Table 5 when no released checkpoint is given.
METHODS = {
    "RDE": {"config": "rde", "overrides": []},
    "RDE-release": {"config": "rde", "overrides": []},   # RDE's released checkpoint (real world, --rde-weights)
    "ICL": {"config": "icl", "overrides": []},            # RDE + RDA (the RDA annotation file)
    "ICL-keep": {"config": "icl", "overrides": []},       # mini: RDA from the "keep" aggregation
    "RDE-noCCD": {"config": "rde", "overrides": ["ccd=false"]},
    "CLIP": {"config": "rde", "overrides": ["loss_names=InfoNCE", "ccd=false"]},
    "IRRA": {"config": "rde", "overrides": ["loss_names=SDM", "ccd=false"]},
}
STEMS = {"CUHK-PEDES": "cuhk_pedes", "ICFG-PEDES": "icfg_pedes", "RSTPReid": "rstpreid",
         "UFine6926": "ufine6926"}
PAPER_DATASETS = tuple(STEMS)
# xi per target in the real world: the paper (Sec. 4.6) sets xi "in the range of 0.5-0.6"; the
# values 0.5 and 0.55 (ICFG-PEDES) are those of the ICL release's run script, not the paper's.
PAPER_XI = {"ICFG-PEDES": 0.55}
XI_SOURCE = "the ICL release's run script (0.5; 0.55 for ICFG-PEDES); the paper says 0.5-0.6"
# The MLLM of each THI row: "calibrated" (the tables' default), "oracle" (an upper bound),
# "nolora" (Table 6 #2). The real world has the MLLM it is given (with or without --lora).
MLLMS = ("calibrated", "oracle", "nolora")

# Basis of the real world's time estimates. Training pairs: the length of the releases' noise
# index files (QinYang79/RDE noiseindex/<dataset>_0.2.npy). Test queries: the IRRA test splits.
# UFine6926's counts are not in the releases: CUHK-PEDES's are assumed. Throughputs are
# ASSUMPTIONS (no GPU was measured in this repository's sessions): 300 training pairs/s for
# ViT-B/16 at 384x128, batch 64, autocast, forward + backward + CCD's loss pass, per 24 GB GPU;
# a THI query costs about 3 MLLM requests and Qwen2-VL-7B on vLLM answers about 4 requests/s.
TRAIN_PAIRS = {"CUHK-PEDES": 68126, "ICFG-PEDES": 34674, "RSTPReid": 37010}
TEST_QUERIES = {"CUHK-PEDES": 6156, "ICFG-PEDES": 19848, "RSTPReid": 2000}
GPU_PAIRS_PER_S = 300.0
THI_REQUESTS_PER_QUERY = 3.0
MLLM_REQUESTS_PER_S = 4.0
REAL_BASIS = ("GPU time = training pairs x epochs / 300 pairs/s per GPU (assumed, not measured) "
              "+ THI queries x 3 MLLM requests / 4 requests/s (assumed); pair and query counts "
              "from the releases' noise-index files and the IRRA test splits")


class Unavailable(Exception):
    """A row that this world cannot produce as configured (the message says what is missing);
    ``seconds``: what the row's own jobs would take once the input is given (0: unknown)."""

    def __init__(self, message: str, seconds: float = 0.0):
        super().__init__(message)
        self.seconds = float(seconds)


# The anchor-localization SFT + LoRA training (THI's tuned MLLM). The supplement reports about
# 11 h on two RTX 3090s for one SFT set over the four datasets (~170k records: `python -m rda sft`
# defaults, 40k + 40k CUHK-PEDES, 15k + 15k each for ICFG-PEDES, RSTPReid, UFine6926).
SFT_HOURS_TWO_GPUS = 11.0
SFT_BASIS = ("the supplement: about 11 h on two RTX 3090s for ~170k SFT records (scaled by 2 / GPUs); "
             "SFT data: ~10 min per dataset to encode and rank its training split (assumed)")


def _n(x: float) -> str:
    return f"{x:g}"


class World:
    """The interface the tables use."""

    name = "?"
    datasets: tuple = ()
    time_unit = "GPU"
    noise_rates: tuple = (0.0, 0.2, 0.5, 0.8)  # RDE's noise table
    noise_datasets: tuple = ()                 # the noise table's datasets (empty: all)
    noccd_rates: tuple = ()                    # rates with an RDE-without-CCD row (empty: all > 0)
    noccd_datasets: tuple = ()                 # datasets with an RDE-without-CCD row (empty: all)

    seeds: tuple = (0,)                        # training (and MLLM) seeds of every row

    def train(self, method: str, dataset: str, *, noise: float = 0.0, group: int = 1, seed: int = 0):
        raise NotImplementedError

    def evaluate(self, run_dir: str, source: str, target: str):
        raise NotImplementedError

    def thi(self, run_dir: str, target_name: str, target: str, *, lora: bool = True,
            mllm: str = "calibrated", seed: int = 0):
        raise NotImplementedError

    def sweep(self, run_dir: str, target_name: str, target: str, *, curve: str = "grid"):
        raise NotImplementedError

    def paper_dataset(self, dataset: str) -> str:
        return dataset

    # shared helpers -------------------------------------------------------------------------
    def run_name(self, method: str, dataset: str, noise: float, group: int) -> str:
        name = f"{method.lower()}_{dataset}"
        if noise:
            name += f"_n{_n(noise)}"
        if group == 2:
            name += "_pre"
        return name

    def noise_overrides(self, dataset: str, noise: float) -> list:
        """Where a noisy run's caption permutation comes from (``noisy_file`` / ``noise_draw``)."""
        raise NotImplementedError

    def model(self, method: str, dataset: str, target: Optional[str] = None, *,
              noise: float = 0.0, group: int = 1, seed: int = 0):
        """Train (or reuse) and evaluate on ``target``: (eval run dir, eval target name, jobs)."""
        run, jobs = self.train(method, dataset, noise=noise, group=group, seed=seed)
        erun, tname, ejobs = self.evaluate(run, dataset, target or dataset)
        return erun, tname, jobs + ejobs

    def _noise_and_rda(self, method: str, dataset: str, noise: float, jobs: list) -> list:
        """The training overrides for a noise rate and, for ICL, the RDA annotation file (whose
        generation jobs, if any, are appended to ``jobs``). ``ICL-keep``: ICL with the RDA file
        of the other aggregation mode (mini world)."""
        over = [f"noisy_rate={_n(noise)}", *self.noise_overrides(dataset, noise)] if noise else []
        if method.startswith("ICL"):
            rda, rjobs = (self.rda_file(dataset, aggregation=method.split("-", 1)[1])
                          if "-" in method else self.rda_file(dataset))
            jobs += rjobs
            over.append(f"anno_file={rda}")
        return over


class RealWorld(World):
    """The benchmarks under ``root``; the MLLM options are passed to rda/thi as given."""

    name = "real"

    # The paper reports one RDE-without-CCD training: RDE Table 2 #7, CUHK-PEDES at 50% noise.
    noccd_rates = (0.5,)
    noccd_datasets = ("CUHK-PEDES",)

    def __init__(self, *, root: str, runs: str, datasets, gpus: int = 1, mllm_args=(),
                 lora: Optional[str] = None, rda_files: Optional[dict] = None,
                 pre_checkpoint=None, irra_weights: Optional[dict] = None,
                 rounds: int = thi_defaults.ROUNDS, lam: float = thi_defaults.LAMBDA,
                 configs: str = "configs",
                 sweep_lams="0.5,0.6,0.7,0.8,0.9", sweep_xis="0.4,0.45,0.5,0.55,0.6",
                 noise_dir: str = "noiseindex", merged_mllm: Optional[str] = None,
                 train_lora: bool = False, base_mllm: Optional[str] = None,
                 rde_weights: Optional[dict] = None):
        self.root, self.runs, self.gpus = root, runs, int(gpus)
        self.noise_dir = noise_dir
        self.datasets = tuple(datasets)
        self.mllm_args, self.lora = list(mllm_args), lora
        # THI's tuned MLLM: an adapter (--lora), a merged folder (--merged-mllm), or the SFT step's
        # adapter (--train-lora); with none of them the rows that need it are listed as not run.
        self.merged_mllm, self.train_lora = merged_mllm, bool(train_lora)
        self.base_mllm = base_mllm
        self.rda_files = dict(rda_files or {})
        # group 2: a folder holding best0/1/2.pth (the release's choice per dataset) or {dataset: file}
        self.pre_checkpoint, self.irra_weights = pre_checkpoint, dict(irra_weights or {})
        self.rde_weights = dict(rde_weights or {})
        self.rounds, self.lam, self.configs = int(rounds), float(lam), configs
        self.sweep_lams, self.sweep_xis = sweep_lams, sweep_xis

    def _train_seconds(self, dataset: str, epochs: int = 60) -> float:
        pairs = TRAIN_PAIRS.get(dataset, TRAIN_PAIRS["CUHK-PEDES"])
        return pairs * epochs / GPU_PAIRS_PER_S / max(self.gpus, 1)

    def _thi_seconds(self, dataset: str) -> float:
        q = TEST_QUERIES.get(dataset, TEST_QUERIES["CUHK-PEDES"])
        return q * THI_REQUESTS_PER_QUERY / MLLM_REQUESTS_PER_S

    def noise_overrides(self, dataset, noise):
        # The release's permutation (noiseindex/<dataset>_<rate>.npy, as its run_rde.sh names it).
        return [f"noisy_file={os.path.join(self.noise_dir, release_noise_name(dataset, noise))}"]

    def rda_file(self, dataset: str, aggregation: Optional[str] = None) -> tuple:
        if aggregation is not None:
            raise Unavailable("the aggregation mode is the MLLM's own in the real world")
        if dataset in self.rda_files:
            return self.rda_files[dataset], []
        out = os.path.join(self.runs, "rda", f"{dataset}.rda.json")
        job = Job(f"RDA generation ({dataset})",
                  py("-m", "rda", "generate", "--dataset", dataset, "--root", self.root, "--out",
                     out, *self.mllm_args, "--no-progress"), out,
                  seconds=TRAIN_PAIRS.get(dataset, TRAIN_PAIRS["CUHK-PEDES"]) * 6 / MLLM_REQUESTS_PER_S,
                  basis="training captions x ~6 MLLM requests (VQA, aggregation, decomposition, "
                        "rewrites) / 4 requests/s (assumed)")
        return out, [job]

    def train(self, method, dataset, *, noise=0.0, group=1, seed=0):
        released = {"IRRA": ("IRRA", self.irra_weights), "RDE-release": ("RDE", self.rde_weights)}
        if method in released:
            who, weights = released[method]
            if dataset not in weights:
                if method == "IRRA":  # the stand-in: RDE's architecture trained with SDM
                    return self._train_run(method, dataset, noise, group)
                raise Unavailable(f"{who}'s released checkpoint for {dataset} not given (--rde-weights "
                                  f"{dataset}=PATH)")
            run = os.path.join(self.runs, f"{who.lower()}_release_{dataset}")
            cfg = os.path.join(self.configs, f"rde_{STEMS[dataset]}.yaml")
            job = Job(f"evaluate {who}'s released weights on {dataset}",
                      py("test.py", run, f"root_dir={self.root}", "--weights",
                         weights[dataset], "--config", cfg, "--root", self.root,
                         "--no-progress"),
                      rd.eval_file(run, dataset),
                      seconds=60, basis="one test-set pass")
            return run, [job]
        return self._train_run(method, dataset, noise, group)

    def pre_checkpoint_for(self, dataset: str) -> Optional[str]:
        """Group 2's init for ``dataset`` (the release's best0/1/2 from a folder, or a per-dataset file)."""
        pre = self.pre_checkpoint
        if not pre:
            return None
        if isinstance(pre, dict):
            if dataset in pre:
                return pre[dataset]
            if "" in pre:  # a folder (named without DATASET=): the release's file for the dataset
                return pre_checkpoint(os.path.join(pre[""], ""), dataset, check=False)
            return None
        return pre_checkpoint(os.path.join(pre, ""), dataset, check=False)

    def _train_run(self, method, dataset, noise, group):
        spec = METHODS[method]
        jobs = []
        cfg = os.path.join(self.configs, f"{spec['config']}_{STEMS[dataset]}.yaml")
        name = self.run_name(method, dataset, noise, group)
        init = None
        if group == 2:
            init = self.pre_checkpoint_for(dataset)
            if not init:
                raise Unavailable(
                    f"group 2 (+pre) needs --pre-checkpoint: a folder holding {PRE_SOURCE} "
                    f"(the release starts {dataset} from {PRE_CHECKPOINT_FILES.get(dataset, '?')}), "
                    f"or {dataset}=PATH", seconds=self._train_seconds(dataset))
            name = name[:-len("_pre")] + "_" + pre_tag(init)
        run = os.path.join(self.runs, name)
        over = [f"root_dir={self.root}", f"name={name}", "resume=true", *spec["overrides"]]
        over += self._noise_and_rda(method, dataset, noise, jobs)
        if init:
            over.append(f"init_checkpoint={init}")
        launcher = (["torchrun", "--nproc_per_node", str(self.gpus), "train.py"] if self.gpus > 1
                    else py("train.py"))
        argv = [*launcher, "--config", cfg, "--run-dir", run, "--no-progress", *over]
        label = f"train {name}"
        noise_file = next((o.split("=", 1)[1] for o in over if o.startswith("noisy_file=")), None)
        if noise_file and not os.path.isfile(noise_file):  # train.py refuses without it: say so now
            label += f" (needs {noise_file}: copy noiseindex/ from the RDE release, 2024-CVPR-RDE/noiseindex)"
        jobs.append(Job(label, argv, rd.eval_file(run, dataset),
                        seconds=self._train_seconds(dataset), basis=REAL_BASIS))
        return run, jobs

    def evaluate(self, run_dir, source, target):
        if target == source:
            return run_dir, target, []
        job = Job(f"evaluate {os.path.basename(run_dir)} on {target}",
                  py("test.py", run_dir, "--dataset", target, "--root", self.root, "--no-progress"),
                  rd.eval_file(run_dir, target),
                  seconds=120, basis="one test-set pass (about 2 min, assumed)")
        return run_dir, target, [job]

    def tuned_mllm(self) -> tuple:
        """(THI's MLLM flags for the tuned model, the jobs that make it). Unavailable when no tuned
        model is given: --lora ADAPTER, --merged-mllm DIR, or --train-lora (the SFT step)."""
        if self.lora:
            return ["--lora", self.lora], []
        if self.merged_mllm:
            return ["--model", self.merged_mllm, "--merged"], []
        if self.train_lora:
            adapter, jobs = self.lora_jobs()
            return ["--lora", adapter], jobs
        raise Unavailable("needs THI's LoRA-tuned MLLM (--lora ADAPTER, --merged-mllm DIR or --train-lora)")

    def lora_jobs(self) -> tuple:
        """The anchor-localization SFT: one LLaMA-Factory dataset from the ICL run of each paper
        dataset (``python -m rda sft``, ~170k records), then the LoRA (``scripts/sft_lora.sh``)."""
        folder = os.path.join(self.runs, "sft")
        adapter = os.path.join(folder, "icl_lora")
        jobs, names = [], []
        for ds in (d for d in PAPER_DATASETS if d in self.datasets):
            run, tjobs = self.train("ICL", ds)
            jobs += tjobs
            name = f"icl_anchor_{STEMS[ds]}"
            names.append(name)
            jobs.append(Job(f"SFT data from {os.path.basename(run)} ({ds})",
                            py("-m", "rda", "sft", "--run", run, "--root", self.root, "--out", folder,
                               "--name", name, "--no-progress"),
                            os.path.join(folder, f"{name}.meta.json"), seconds=600, basis=SFT_BASIS))
        base = self.base_mllm or "<Qwen2-VL-7B-Instruct>"
        env = {"FORCE_TORCHRUN": "1", "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(self.gpus))} \
            if self.gpus > 1 else {}
        jobs.append(Job("anchor-localization LoRA (LLaMA-Factory SFT)",
                        ["bash", "scripts/sft_lora.sh", "train", base, folder, adapter,
                         "dataset=" + ",".join(names)],
                        os.path.join(adapter, "adapter_config.json"),
                        seconds=SFT_HOURS_TWO_GPUS * 3600 * 2 / max(self.gpus, 1), basis=SFT_BASIS, env=env))
        return adapter, jobs

    def thi(self, run_dir, target_name, target, *, lora=True, mllm="calibrated", seed=0):
        if mllm == "oracle":
            raise Unavailable("the real world has no oracle MLLM (the mini world's upper bound)")
        lora = lora and mllm != "nolora"
        suffix = "" if lora else "_nolora"
        out = rd.thi_dir(run_dir, target_name, rd.BEST, "paper" + suffix)
        args = list(self.mllm_args)
        jobs = []
        if lora:
            try:
                flags, jobs = self.tuned_mllm()
            except Unavailable as exc:
                raise Unavailable(str(exc), seconds=self._thi_seconds(target)) from None
            args += flags
        else:
            args += ["--no-lora"]  # Table 6 #2: the base model, named in THI's folder and table
        xi = PAPER_XI.get(target, 0.5)
        argv = py("-m", "thi", "--run", run_dir, "--target", target_name, "--root", self.root,
                  *args, "--xi", _n(xi), "--lam", _n(self.lam), "--rounds", str(self.rounds),
                  "--out", out, "--cache-dir", rd.mllm_cache_dir(run_dir) + suffix,
                  "--no-progress")
        return out, jobs + [Job(f"THI{'' if lora else ' (no LoRA)'} {os.path.basename(run_dir)} -> {target}",
                                argv, os.path.join(out, rd.THI_COST), seconds=self._thi_seconds(target),
                                basis=REAL_BASIS)]

    def sweep(self, run_dir, target_name, target, *, curve="grid"):
        out = rd.thi_dir(run_dir, target_name, rd.BEST, "sweep")
        try:
            flags, tjobs = self.tuned_mllm()
        except Unavailable as exc:
            raise Unavailable(str(exc), seconds=self._thi_seconds(target) * 2) from None
        args = list(self.mllm_args) + flags
        argv = py("-m", "thi", "sweep", "--run", run_dir, "--target", target_name, "--root",
                  self.root, *args, "--lams", self.sweep_lams, "--xis", self.sweep_xis,
                  "--rounds", str(self.rounds), "--out", out,
                  "--cache-dir", rd.mllm_cache_dir(run_dir), "--no-progress")
        n_xi = len(self.sweep_xis.split(","))
        return out, tjobs + [Job(f"THI sweep {os.path.basename(run_dir)} -> {target}", argv,
                         os.path.join(out, rd.THI_SWEEP),
                         seconds=self._thi_seconds(target) * (1 + 0.2 * (n_xi - 1)),
                         basis=REAL_BASIS + "; later xi reuse the cached localization answers")]


class MiniWorld(World):
    """SynthPEDES domains standing in for the paper's datasets (``configs/repro_mini.yaml``).

    Every row runs once per seed (``seeds``: the training seed and the simulated MLLM's seed) on
    the same data. Run folders are ``RUNS/s<seed>/<name>-<identity>``: the identity is a digest
    of the resolved training command, the training config's content, the backbone and the
    domain, so a run made with another configuration (another scale, --train-config, ...) is
    never taken for this one."""

    name = "mini"
    time_unit = "CPU"

    def __init__(self, cfg: dict, *, runs: Optional[str] = None, scale: str = "full",
                 train_config: Optional[str] = None, pretrained: Optional[str] = None,
                 seeds: Optional[int] = None):
        self.cfg = cfg
        self.scale_name = scale
        sc = (cfg.get("scales") or {}).get(scale, {}) if scale != "full" else {}
        if scale != "full" and not sc:
            raise ValueError(f"the mini config has no scale {scale!r} (scales: "
                             f"{sorted(cfg.get('scales') or {})})")
        self.scale = sc
        self.runs = runs or cfg["runs"]
        # a scale may replace the backbone and the training config (CI: a random tiny CLIP)
        cfg = {**cfg, **{k: sc[k] for k in ("pretrained", "pretrain_command", "train_config") if k in sc}}
        cfg["pretrained"] = str(cfg["pretrained"]).replace("{runs}", self.runs)
        self.cfg = cfg
        self.train_config = train_config or cfg["train_config"]
        self.pretrained = pretrained or cfg["pretrained"]
        n_seeds = int(seeds if seeds is not None else sc.get("seeds", cfg.get("seeds", 1)))
        if n_seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {n_seeds}")
        self.seeds = tuple(range(n_seeds))
        self.domains = {}
        for ds, dom in cfg["domains"].items():
            if ds not in STEMS:
                raise ValueError(f"mini config: domain {ds!r} is not one of {PAPER_DATASETS}")
            dom = {**dom, **{k: v for k, v in sc.get("domain", {}).items()}}
            if scale != "full":  # small data of its own, never the full-scale folders
                dom["root"] = os.path.join(self.runs, f"data_{STEMS[ds]}")
            self.domains[ds] = dom
        self.datasets = tuple(self.domains)
        thi = {**cfg.get("thi", {}), **sc.get("thi", {})}
        self.xi, self.lam = thi.get("xi", "auto"), float(thi.get("lam", thi_defaults.LAMBDA))
        self.rounds = int(thi.get("rounds", thi_defaults.ROUNDS))
        self.profiles = {"calibrated": "tiny-qwen2vl", "oracle": "oracle",
                         "nolora": "untuned-tiny-qwen2vl", **(cfg.get("mllm_profiles") or {})}
        rda = cfg.get("rda", {})
        self.rda_aggregation = rda.get("aggregation", "concise")
        self.rda_rewrites = int(rda.get("rewrites", 3))
        self.secs = cfg.get("cpu_seconds", {})
        self.noise_rates = tuple(sc.get("noise_rates", cfg.get("noise_rates", self.noise_rates)))
        self.noise_datasets = tuple(cfg.get("noise_datasets") or ())
        self.noccd_rates = tuple(float(r) for r in cfg.get("noccd_rates") or ())

    @classmethod
    def from_file(cls, path: str, **kw) -> "MiniWorld":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"mini-world config {path} not found (configs/repro_mini.yaml)")
        with open(path, encoding="utf-8") as f:
            return cls(yaml.safe_load(f), **kw)

    def paper_dataset(self, dataset):
        return dataset

    def root(self, dataset: str) -> str:
        return self.domains[dataset]["root"]

    def _pairs(self, dataset: str) -> int:
        d = self.domains[dataset]
        return int(d["num_ids"] * 0.6) * int(d.get("images_per_id", 2)) * int(d.get("captions_per_image", 2))

    def _queries(self, dataset: str) -> int:
        d = self.domains[dataset]
        return int(d["num_ids"] * 0.3) * int(d.get("images_per_id", 2)) * int(d.get("captions_per_image", 2))

    def _epochs(self) -> int:
        for o in self.scale.get("train", []):
            if o.startswith("num_epoch="):
                return int(o.split("=", 1)[1])
        with open(self.train_config, encoding="utf-8") as f:
            return int((yaml.safe_load(f) or {}).get("num_epoch", 60))

    def basis(self) -> str:
        s = self.secs
        return (f"CPU time = training pairs x epochs x {s.get('per_pair_epoch', 0.0):g} s + THI "
                f"queries x {s.get('per_thi_query', 0.0):g} s per round, measured on the 2-core "
                f"session machine ({s.get('measured', 'not measured yet')})")

    # identities -------------------------------------------------------------------------------
    def backbone_identity(self) -> str:
        """The tiny CLIP: the command that writes it, or the file's content."""
        cmd = self.cfg.get("pretrain_command")
        if cmd:
            return "command:" + cmd
        return "file:" + (file_digest(self.pretrained) if os.path.isfile(self.pretrained) else self.pretrained)

    def _domain_identity(self, dataset: str) -> str:
        return digest(self.domains[dataset])

    def _config_identity(self) -> str:
        return file_digest(self.train_config) if os.path.isfile(self.train_config) else self.train_config

    def prepare(self, dataset: str) -> list:
        """Jobs that write the domain's SynthPEDES folder and the pre-trained tiny CLIP."""
        d = self.domains[dataset]
        folder = os.path.join(d["root"], "SynthPEDES")
        argv = py("-m", "offline.synthpedes", folder, "--num-ids", str(d["num_ids"]),
                  "--images-per-id", str(d.get("images_per_id", 2)),
                  "--captions-per-image", str(d.get("captions_per_image", 2)),
                  "--seed", str(d.get("seed", 0)))
        jobs = [Job(f"generate the {dataset} domain (SynthPEDES, seed {d.get('seed', 0)})", argv,
                    os.path.join(folder, "reid_raw.json"), seconds=d["num_ids"] * 0.02,
                    # identity: the generator's parameters (not the module path, which may move)
                    basis=self.basis(), identity=digest("data", argv[4:]), run_dir=folder)]
        cmd = self.cfg.get("pretrain_command")
        if cmd:
            argv = [a.replace("{out}", self.pretrained) for a in shlex.split(cmd)]
            if argv and argv[0] == "python":
                argv = py(*argv[1:])
            jobs.append(Job("pre-train the tiny CLIP", argv, self.pretrained,
                            seconds=float(self.secs.get("pretrain", 0.0)), basis=self.basis(),
                            identity=digest("backbone", cmd), run_dir=self.pretrained))
        elif not os.path.isfile(self.pretrained):
            raise Unavailable(f"no tiny CLIP checkpoint at {self.pretrained}: set pretrain_command "
                              f"in the mini config or pass --pretrained")
        return jobs

    def noise_overrides(self, dataset, noise):
        # SynthPEDES domains have no released permutation: drawn from the run's seed (not saved).
        return ["noise_draw=true"]

    def rda_file(self, dataset: str, aggregation: Optional[str] = None) -> tuple:
        aggregation = aggregation or self.rda_aggregation
        args = ["-m", "rda", "generate", "--dataset", "SynthPEDES", "--root", self.root(dataset),
                "--backend", "simulated", "--aggregation", aggregation,
                "--rewrites", str(self.rda_rewrites), "--no-progress"]
        ident = digest("rda", args, self._domain_identity(dataset))
        out = os.path.join(self.runs, "rda", f"{STEMS[dataset]}_{aggregation}-{ident}.rda.json")
        job = Job(f"RDA generation ({dataset} domain, simulated MLLM, {aggregation} aggregation)",
                  py(*args[:-1], "--out", out, "--no-progress"),
                  out, seconds=self._pairs(dataset) * float(self.secs.get("per_rda_pair", 0.0)),
                  basis=self.basis(), identity=ident, run_dir=out)
        return out, self.prepare(dataset) + [job]

    def train(self, method, dataset, *, noise=0.0, group=1, seed=0):
        spec = METHODS[method]
        jobs = self.prepare(dataset)
        name = self.run_name(method, dataset, noise, group)
        over = [f"root_dir={self.root(dataset)}", "dataset_name=SynthPEDES",
                f"pretrain_choice={self.pretrained}", "resume=true", f"seed={seed}",
                *self.cfg.get("train_overrides", []), *spec["overrides"],
                *self.scale.get("train", [])]
        over += self._noise_and_rda(method, dataset, noise, jobs)
        if group == 2:
            src = (self.cfg.get("group2_init") or {}).get(dataset)
            if not src or src not in self.domains:
                raise Unavailable(f"group 2 (+pre) on {dataset}: set group2_init.{dataset} in the "
                                  f"mini config to another domain")
            pre_run, pjobs = self.train("RDE", src, seed=seed)
            jobs += pjobs
            over.append(f"init_checkpoint={rd.checkpoint_path(pre_run, rd.BEST)}")
        ident = digest("train", self.train_config, self._config_identity(), self.backbone_identity(),
                       self._domain_identity(dataset), over)
        run = os.path.join(self.runs, f"s{seed}", f"{name}-{ident}")
        argv = py("train.py", "--config", self.train_config, "--run-dir", run, "--no-progress",
                  f"name={name}", *over)
        secs = self._pairs(dataset) * self._epochs() * float(self.secs.get("per_pair_epoch", 0.0))
        jobs.append(Job(f"train {name} (seed {seed})", argv,
                        rd.eval_file(run, "SynthPEDES"),
                        seconds=secs, basis=self.basis(), identity=ident, seed=seed, run_dir=run))
        return run, jobs

    @staticmethod
    def seed_of(run_dir: str) -> int:
        part = os.path.basename(os.path.dirname(run_dir.split("__on_")[0]))
        return int(part[1:]) if part.startswith("s") and part[1:].isdigit() else 0

    def evaluate(self, run_dir, source, target):
        if target == source:
            return run_dir, "SynthPEDES", []
        # Every domain is a SynthPEDES folder under its own root, so a cross-domain evaluation
        # gets a run directory of its own (the same weights and config, the target's root).
        erun = f"{run_dir}__on_{target}"
        argv = py("test.py", erun, f"root_dir={self.root(target)}", "anno_file=null",
                  "noisy_rate=0.0", "init_checkpoint=null", "--weights",
                  rd.checkpoint_path(run_dir, rd.BEST), "--config",
                  rd.config_path(run_dir), "--no-progress")
        job = Job(f"evaluate {os.path.basename(run_dir)} on the {target} domain", argv,
                  rd.eval_file(erun, "SynthPEDES"),
                  seconds=self._queries(target) * float(self.secs.get("per_eval_query", 0.0)),
                  basis=self.basis(), identity=digest("eval", argv[1:], self._domain_identity(target)),
                  seed=self.seed_of(run_dir), run_dir=erun)
        return erun, "SynthPEDES", self.prepare(target) + [job]

    def xi_arg(self, run_dir: str, target_name: str):
        if self.xi != "auto":
            return _n(float(self.xi))
        return Lazy(lambda: f"{results.xi_of_run(run_dir, target_name):.4f}",
                    f"<xi: Fig. 3 crossover of {rd.eval_dir(run_dir, target_name)}>")

    def _thi_common(self, run_dir, target_name, target, mllm, seed):
        if mllm not in self.profiles:
            raise ValueError(f"unknown MLLM {mllm!r}; the mini world has {sorted(self.profiles)}")
        d = self.domains[target]
        return ["--run", run_dir, "--target", target_name, "--root", d["root"],
                "--backend", "simulated", "--mllm-profile", str(self.profiles[mllm]),
                "--seed", str(seed), "--rounds", str(self.rounds), "--no-progress"]

    def thi(self, run_dir, target_name, target, *, lora=True, mllm="calibrated", seed=None):
        mllm = mllm if lora else "nolora"
        seed = self.seed_of(run_dir) if seed is None else seed
        common = self._thi_common(run_dir, target_name, target, mllm, seed)
        ident = digest("thi", common, self.lam, self.xi)
        out = rd.thi_dir(run_dir, target_name, rd.BEST, f"{mllm}-{ident}")
        argv = py("-m", "thi", *common, "--xi", self.xi_arg(run_dir, target_name),
                  "--lam", _n(self.lam), "--out", out,
                  "--cache-dir", f"{rd.mllm_cache_dir(run_dir)}_{mllm}")
        secs = self._queries(target) * self.rounds * float(self.secs.get("per_thi_query", 0.0))
        what = {"calibrated": "calibrated MLLM", "oracle": "oracle MLLM (upper bound)",
                "nolora": "MLLM without tuning"}.get(mllm, mllm)
        return out, [Job(f"THI, {what}: {os.path.basename(run_dir)}", argv,
                         os.path.join(out, rd.THI_COST), seconds=secs, basis=self.basis(),
                         identity=ident, seed=seed, run_dir=out)]

    def sweep_values(self, curve: str) -> dict:
        sw = {**self.cfg.get("sweep", {}), **self.scale.get("sweep", {})}
        return {"xis": [float(x) for x in sw.get("xis", [0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7])],
                "lams": [float(x) for x in sw.get("lams", [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])],
                "xi_quantiles": [float(q) for q in sw.get("xi_quantiles", [])]}

    def sweep(self, run_dir, target_name, target, *, curve="xi"):
        """Fig. 5's curves: ``xi`` (the paper's xi axis, the tables' xi and quantiles of the run's
        top-1 similarities, whose scale is the tiny model's, at the tables' lambda) or ``lam``
        (the sweep's lambda values at the tables' xi); calibrated MLLM."""
        vals = self.sweep_values(curve)
        table_xi = self.xi_arg(run_dir, target_name)
        if curve == "xi":
            def xis() -> str:
                t = table_xi if isinstance(table_xi, str) else table_xi.resolve()
                top1 = results.load_eval(run_dir, target_name)["similarity"].max(axis=1)
                qs = {round(float(np.quantile(top1, q)), 4) for q in vals["xi_quantiles"]}
                return ",".join(f"{v:g}" for v in sorted(set(vals["xis"]) | qs | {round(float(t), 4)}))

            grid = ["--lams", _n(self.lam), "--xis",
                    Lazy(xis, f"<{','.join(_n(v) for v in vals['xis'])}, the tables' xi and top-1 "
                              f"quantiles {vals['xi_quantiles']}>")]
        else:
            grid = ["--lams", ",".join(_n(v) for v in vals["lams"]), "--xis", table_xi]
        seed = self.seed_of(run_dir)
        common = self._thi_common(run_dir, target_name, target, "calibrated", seed)
        ident = digest("sweep", curve, common, vals)
        out = rd.thi_dir(run_dir, target_name, rd.BEST, f"sweep_{curve}-{ident}")
        argv = py("-m", "thi", "sweep", *common, *grid, "--out", out,
                  "--cache-dir", f"{rd.mllm_cache_dir(run_dir)}_calibrated")
        n = len(vals["xis"]) + len(vals["xi_quantiles"]) + 1 if curve == "xi" else len(vals["lams"])
        secs = self._queries(target) * self.rounds * n * float(self.secs.get("per_thi_query", 0.0))
        return out, [Job(f"THI sweep over {'xi' if curve == 'xi' else 'lambda'} "
                         f"{os.path.basename(run_dir)}", argv, os.path.join(out, rd.THI_SWEEP),
                         seconds=secs, basis=self.basis(), identity=ident, seed=seed, run_dir=out)]
