"""From runs to a paper's table in one command: run a recipe (a published table written as data,
recipes/<name>.json), skipping what is finished, then write the table and its figures.

    python reproduce.py --recipe clip-handid --data_root /data          # 11k in /data/11k, HD in /data/HD
    python reproduce.py --recipe clip-fh --seeds 0 1 2 --dry_run        # print every command
    python reproduce.py --recipe cross-aspect --only method=finetune backbone=ViT-B/16
    python reproduce.py --recipe clip-handid --tiny                     # synthetic data, tiny models, a CPU

Recipes: clip-handid (the MBA-Net / CLIP-HandID tables: zero-shot, fine-tuning and CLIP-HandID x
ViT-B/16 and RN50 on the four 11k aspects and HD), clip-fh (the CLIP-FH thesis table: zero-shot,
CLIP-ReID and PromptSG x both backbones on 11k dorsal right), cross-aspect (trained on each 11k
aspect, tested on every aspect and HD). A recipe file given by path works the same.

What it does, in order: prepares the split roots that are missing (each data set's prepare script;
with --tiny it first draws the synthetic data), trains every run once per --seeds value, evaluates
every run on its test split roots under the recipe's protocol, and writes the table
(<out>/<recipe>/table.md, .tex, .csv, .json, by collect_results.py) with the CMC/ROC figures and a
ranking figure of the best row. Each step is a script of this repository run with its own flags;
--dry_run prints them all.

Finished work is skipped, decided from the outputs themselves: a training run whose config.json
records the same flags and whose metrics.csv covers all its epochs (with net_last.pth), an evaluation
whose results.json holds every split and whose config.json records the same flags. An interrupted
training continues with --resume; an evaluation of a run that trained in this call is redone. Output
that records other flags than the recipe asks for is refused (one line naming the flag) unless
--force, which redoes it.
"""
import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
import traceback

from utils import io, outputs, recipes, tables
from utils.recipe_steps import Plan, command, evaluation_status, load_script, results_file, shell_line, status, step_label
from utils.errors import ClipFHError, RecipeError

INTERRUPTED = 130


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help=f"a recipe name ({', '.join(recipes.available())}) or a recipe file")
    p.add_argument("--data_root", default=".", help="folder holding the data sets (11k/, HD/) and their split roots")
    p.add_argument("--data", action="append", default=[], metavar="FOLDER=PATH",
                   help="where one data set lives when not under --data_root, e.g. --data 11k=/data/11k (repeatable)")
    p.add_argument("--out", default="./reproduce",
                   help="output root: runs/ (trainings and their evaluations), zero-shot/, logs/ and <recipe>/ (the "
                        "table and figures); recipes sharing it share the runs they have in common")
    p.add_argument("--seeds", type=io.seed_value, nargs="+", default=[0], help="training seeds; each trained run once per seed")
    p.add_argument("--only", nargs="+", default=[], metavar="KEY=VALUES",
                   help="a subset: method=, backbone=, train=, test= or seed= with comma-separated values (split roots "
                        "by short name: dorsal_r, dorsal_l, palmar_r, palmar_l, HD); several filters all apply; zero-shot "
                        "has no train")
    p.add_argument("--dry_run", action="store_true", help="print every command (and whether it is done) and stop")
    p.add_argument("--tiny", action="store_true",
                   help="synthetic data, tiny random models and short runs on a CPU (recipes/tiny.json): tests the "
                        "pipeline in minutes, the numbers mean nothing; data and checkpoints go to <out>/tiny_data")
    p.add_argument("--launcher", choices=["subprocess", "in_process"], default=None,
                   help="run each step as its own Python process (default: a crash, a leak of GPU memory or a global "
                        "setting of one run cannot touch the next) or in this process (default with --tiny, where "
                        "importing torch per step would take longer than the step)")
    p.add_argument("--device", default=None, type=io.device_value, help="passed to every step (default: each script's own, CUDA when present)")
    p.add_argument("--num_workers", type=int, default=None, help="passed to every step (default: each script's own)")
    p.add_argument("--force", action="store_true",
                   help="redo outputs that record other flags than the recipe asks for (default: refuse)")
    args = p.parse_args(argv)
    if args.num_workers is not None and args.num_workers < 0:
        p.error("--num_workers must be >= 0")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds lists a seed twice: {args.seeds}")
    for item in args.data:
        if "=" not in item or not item.split("=", 1)[0] or not item.split("=", 1)[1]:
            p.error(f"--data takes FOLDER=PATH (e.g. 11k=/data/11k), got {item!r}")
    args.launcher = args.launcher or ("in_process" if args.tiny else "subprocess")
    return args


# ---- running ----

def run_step(step, argv, launcher, log_path):
    """Run one step; returns its exit code (0 success, 130 interrupted). Output goes to log_path."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"$ {shell_line(step, argv)}\n")
        log.flush()
        if launcher == "subprocess":
            return wait_for(subprocess.Popen([sys.executable, os.path.join(io.REPO_DIR, step["script"]), *argv],
                                             stdout=log, stderr=subprocess.STDOUT))
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                load_script(step["script"]).main(argv)
                return 0
            except SystemExit as exit_:
                if exit_.code in (None, 0):
                    return 0
                if isinstance(exit_.code, int):
                    return exit_.code
                print(exit_.code)
                return 1
            except KeyboardInterrupt:
                print("interrupted (Ctrl-C)")
                return INTERRUPTED
            except Exception:  # a bug in a step: its traceback goes to its log, the recipe goes on
                traceback.print_exc()
                return 1


def make_tiny_data(plan, log):
    """The synthetic data sets and tiny checkpoints of --tiny (each drawn once, then kept)."""
    from utils import synthetic
    import clip
    for folder in dict.fromkeys(s["folder"] for s in plan.steps if s["kind"] == "prepare"):
        data_dir = plan.data_dir(folder)
        marker = os.path.join(data_dir, synthetic.SYNTHETIC_MARKER)
        if os.path.isfile(marker):
            continue
        sizes = dict(plan.profile["synthetic"][folder])
        for key in ("images_per_id", "image_size"):
            if key in sizes:
                sizes[key] = tuple(sizes[key])
        if folder == "11k":
            synthetic.make_synthetic_11k(data_dir, seed=0, **sizes)
        elif folder == "HD":
            synthetic.make_synthetic_hd(data_dir, seed=0, **sizes)
        else:
            raise RecipeError(f"--tiny has no synthetic data set for {folder}/")
        log(f"drew the synthetic {folder} data set in {data_dir}")
    for name, kind in plan.profile["backbones"].items():
        path = plan.backbone(name)
        if not os.path.isfile(path):
            clip.save_tiny_checkpoint(path, kind=kind, seed=0)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C (the running step is asked to stop and the recipe ends)."""


def _on_sigterm(signum, frame):
    raise Terminated()


def wait_for(proc):
    """Wait for a step's process; on Ctrl-C (which the step received too: same process group) or
    SIGTERM (passed on as SIGINT) let it stop on its own, as it does on Ctrl-C, then return 130."""
    try:
        return proc.wait()
    except KeyboardInterrupt as err:
        if isinstance(err, Terminated):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        return INTERRUPTED


def format_seconds(seconds):
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def dry_run(plan, start):
    counts = {"done": 0, "resume": 0, "run": 0, "stale": 0}
    for step in plan.steps:
        state, why = status(step)
        counts[state] += 1
        print(f"# {step_label(step)}: {'done, skipped' if state == 'done' else state}{f' ({why})' if why else ''}")
        print(shell_line(step, command(step, state)))
    print(f"{plan.recipe['name']} (dry run): {len(plan.steps)} steps, {counts['run'] + counts['resume'] + counts['stale']} "
          f"to run ({counts['resume']} resumed, {counts['stale']} with other recorded flags), {counts['done']} finished, "
          f"in {time.time() - start:.2f} s")
    return {"steps": plan.steps, "counts": counts}


def check_locations(plan):
    """Every folder the recipe writes must be a folder or be free to become one: a file in the way is one
    line before any step runs, not a traceback after them."""
    folders = [plan.out, *(os.path.join(plan.out, name) for name in (*recipes.OUT_FOLDERS, plan.recipe["name"]))]
    folders += [step["out"] for step in plan.steps if "out" in step]
    if plan.args.tiny:
        folders += [os.path.join(plan.data_root, "checkpoints"), *map(plan.data_dir, plan.recipe["data"])]
    for folder in folders:
        blocker = file_in_the_way(folder)
        if blocker:
            raise RecipeError(f"--out {plan.args.out}: {blocker} is a file where reproduce.py needs a folder; move it "
                              f"away or choose another --out")


def file_in_the_way(folder):
    """The path at or above `folder` that exists and is not a folder (None when the folder can be made)."""
    while not os.path.isdir(folder):
        if os.path.lexists(folder):
            return folder
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent
    return None


def check_stale(plan, force):
    """Refuse, before anything runs, output that records other flags than the recipe asks for."""
    stale = [(step, why) for step in plan.steps for state, why in [status(step)] if state == "stale"]
    unfixable = [(s, why) for s, why in stale if s["kind"] == "prepare"]
    if unfixable:
        raise RecipeError(unfixable[0][1])
    if stale and not force:
        step, why = stale[0]
        more = f" (and {len(stale) - 1} more)" if len(stale) > 1 else ""
        raise RecipeError(f"{step['out']} records other flags than recipe {plan.recipe['name']} asks for ({why}){more}; "
                          f"pass --force to redo it, or choose another --out")


def write_table(plan):
    """The table and figures of every finished evaluation of the recipe (--only or not), and a ranking
    figure of the best row. Returns (paths written, rows, problem): ([], [], None) when nothing is
    finished; a problem (one line) when the table could not be written."""
    import collect_results
    import query_ranking_result_demo as ranking
    full = Plan(plan.recipe, argparse.Namespace(**dict(vars(plan.args), only=[])), plan.profile)
    sources = [os.path.dirname(results_file(s)) for s in full.steps
               if s["kind"] == "evaluate" and evaluation_status(s)[0] == "done"]
    if not sources:
        return [], [], None
    folder = os.path.join(plan.out, plan.recipe["name"])
    table = plan.recipe["table"]
    prefix = os.path.join(folder, "table")
    try:
        rows = collect_results.main([*sources, "--out", prefix, "--layout", table.get("layout", "rows"), "--columns",
                                     *table.get("columns", tables.DEFAULT_COLUMNS), "--plot", "--force"])
    except SystemExit as err:  # collect_results reports its errors as one line
        return [], [], f"the table was not written: {err}"
    paths = [f"{prefix}.{ext}" for ext in ("md", "tex", "csv", "json")]
    paths += sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.startswith("table_"))
    column = table.get("columns", tables.DEFAULT_COLUMNS)[0]
    best = [r for r in rows if r["metrics"][column].get("best")]
    mat = next((os.path.join(best[0]["sources"][0], n) for n in ("result_split0_all.mat", "result_split0.mat")
                if os.path.isfile(os.path.join(best[0]["sources"][0], n))), None) if best else None
    if mat:
        try:
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                paths += ranking.main(["--mat", mat, "--num_queries", "3", "--top_k", "6", "--out",
                                       os.path.join(folder, "ranking_best.png"), "--pdf", "--force"])
        except SystemExit as err:
            return paths, rows, f"the ranking figure was not drawn: {err}"
    return paths, rows, None


def reproduce(args):
    start = time.time()
    recipe = recipes.load(args.recipe)
    profile = recipes.load_tiny_profile() if args.tiny else None
    plan = Plan(recipe, args, profile)
    if not plan.steps:
        raise RecipeError(f"--only {' '.join(args.only)} selects nothing of recipe {recipe['name']}")
    check_locations(plan)
    if args.dry_run:
        return dry_run(plan, start)
    check_stale(plan, args.force)
    with outputs.output_errors(plan.out):
        os.makedirs(plan.out, exist_ok=True)
    outputs.check_writable(plan.out, "--out")
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    ran, skipped, failed, blocked, trained_now, record = [], [], [], [], set(), []
    interrupted = False
    try:
        with outputs.FolderLock(plan.out, what="another reproduce.py"):
            if args.tiny:
                make_tiny_data(plan, print)
            for index, step in enumerate(plan.steps, 1):
                state, why = status(step, trained_now)
                if state == "done":
                    skipped.append(step)
                    record.append({"id": step["id"], "status": "finished before"})
                    continue
                missing = [d for d in step["needs"] if d in {s["id"] for s in failed + blocked}]
                if missing:
                    blocked.append(step)
                    record.append({"id": step["id"], "status": f"not run: {missing[0]} failed"})
                    continue
                argv = command(step, state)
                log_path = os.path.join(plan.out, "logs", f"{step['id']}.log")
                print(f"[{index}/{len(plan.steps)}] {step_label(step)}{' (resumed)' if state == 'resume' else ''} ...",
                      flush=True)
                began = time.time()
                code = run_step(step, argv, args.launcher, log_path)
                seconds = time.time() - began
                record.append({"id": step["id"], "command": shell_line(step, argv), "exit_code": code,
                               "seconds": round(seconds, 1), "log": log_path})
                if code == INTERRUPTED:
                    interrupted = True
                    print(f"    interrupted after {format_seconds(seconds)}; run the same command again to continue "
                          f"(log: {log_path})", flush=True)
                    break
                if code != 0:
                    failed.append(step)
                    print(f"    FAILED (exit {code}) after {format_seconds(seconds)}: {last_line(log_path)} "
                          f"(log: {log_path})", flush=True)
                    continue
                ran.append(step)
                if step["kind"] == "train":
                    trained_now.add(step["id"])
                print(f"    done in {format_seconds(seconds)}", flush=True)
            paths, rows, problem = ([], [], None) if interrupted else write_table(plan)
    except KeyboardInterrupt:
        interrupted, paths, rows, problem = True, [], [], None
    finally:
        signal.signal(signal.SIGTERM, previous)
    kinds = ", ".join(f"{sum(s['kind'] == k for s in ran)} {k}" for k in ("prepare", "train", "evaluate")
                      if any(s["kind"] == k for s in ran))
    summary = (f"{recipe['name']}: ran {len(ran)} step(s){f' ({kinds})' if kinds else ''}, skipped {len(skipped)} "
               f"finished, {len(failed)} failed" + (f", {len(blocked)} not run after a failure" if blocked else "")
               + (", INTERRUPTED (run again to continue)" if interrupted else "")
               + f", in {format_seconds(time.time() - start)}"
               + (f"; table {paths[0]}, figures {', '.join(p for p in paths if p.endswith('.pdf'))}" if paths else "")
               + (f"; {problem}" if problem else ""))
    if paths:
        io.atomic_write_json(os.path.join(plan.out, recipe["name"], "reproduce.json"), {
            "recipe": recipe, "args": vars(args), **io.run_info(), "summary": summary, "steps": record})
    print(summary)
    if interrupted:
        raise SystemExit(INTERRUPTED)
    if failed or blocked or problem:
        raise SystemExit(1)
    return {"ran": [s["id"] for s in ran], "skipped": [s["id"] for s in skipped], "rows": rows, "paths": paths,
            "summary": summary}


def last_line(log_path):
    try:
        with open(log_path) as f:
            lines = [line.strip() for line in f if line.strip()]
        return lines[-1][:300] if lines else "no output"
    except OSError:
        return "no log"


def main(argv=None):
    args = parse_args(argv)
    try:
        return reproduce(args)
    except ClipFHError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
