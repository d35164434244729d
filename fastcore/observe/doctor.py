"""The doctor (`python -m fastcore.profile doctor [LOGDIR]`): is TensorBoard ready to show these runs, and if not, why.

  doctor [LOGDIR]    (default: profiles) checks that TensorBoard and the profile plugin import and
                     agree, lists the runs under LOGDIR with their scalars and profile traces, explains
                     what would make TensorBoard say "No profile data was found", and how to view them.
  calibrate          measures the machine's peak matmul GFLOP/s per dtype and path again (the figures
                     utilisation is computed against) and rewrites the cache.

What "agree" means here (from the installed packages' own metadata): `tensorboard-plugin-profile` is a
shim that pins `xprof` to its exact version (2.24.2 -> xprof==2.24.2), and xprof registers the `profile`
TensorBoard plugin. Neither pins TensorBoard, so TensorBoard 2.21 with plugin 2.24 is expected, not a
mismatch. What must hold: the shim's pin is met, every declared requirement of tensorboard, xprof and
the shim is satisfied, exactly one `profile` plugin is registered (an old standalone plugin next to
xprof registers a second), and the plugin loads into this TensorBoard with TensorFlow's profiler.

Exit codes: 0 healthy, 1 a problem found (each printed as PROBLEM with its fix), 2 bad input (a
summary.json that is damaged or not a JSON object: one line naming it).
"""
from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import shlex
import shutil
import sys
import tempfile
import types

from fastcore import atomic
PROFILE_PLUGIN_DISTS = ("tensorboard", "tensorboard_plugin_profile", "xprof")
SKIP_DIRS = {"plugins", "checkpoints", "__pycache__"}
SCALAR_RUNS = ("train", "validation")   # a run's TensorBoard runs, as Keras names them (fastcore.observe.tensorboard)


class Report:
    def __init__(self, out):
        self.out, self.problems = out, 0

    def ok(self, text: str) -> None:
        print(f"  ok       {text}", file=self.out)

    def note(self, text: str) -> None:
        print(f"  note     {text}", file=self.out)

    def problem(self, text: str) -> None:
        self.problems += 1
        print(f"  PROBLEM  {text}", file=self.out)

    def head(self, text: str) -> None:
        print(text, file=self.out)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _unmet_requirements(dist: str) -> list[str]:
    """Declared (unconditional) requirements of `dist` that the installed packages do not meet."""
    from packaging.requirements import Requirement
    unmet = []
    for text in metadata.requires(dist) or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        have = _version(req.name)
        if have is None:
            unmet.append(f"{req} (not installed)")
        elif req.specifier and not req.specifier.contains(have, prereleases=True):
            unmet.append(f"{req} (installed {have})")
    return unmet


def check_install(r: Report):
    """The TensorBoard / profile plugin checks; returns the loaded ProfilePlugin class's module or None."""
    r.head("TensorBoard and the profile plugin")
    tb = _version("tensorboard")
    try:
        import tensorboard  # noqa: F401
        r.ok(f"tensorboard {tb} imports")
    except ImportError as e:
        r.problem(f"tensorboard does not import ({e}): pip install tensorboard")
        return None
    shim, xprof = _version("tensorboard_plugin_profile"), _version("xprof")
    if xprof is None:
        r.problem("the profile plugin is not installed (no xprof): TensorBoard has no Profile tab. "
                  "pip install tensorboard-plugin-profile")
        return None
    pins = [q for q in (metadata.requires("tensorboard_plugin_profile") or []) if q.replace(" ", "").startswith("xprof")] \
        if shim else []
    if shim:
        unmet = _unmet_requirements("tensorboard_plugin_profile")
        if unmet:
            r.problem(f"tensorboard-plugin-profile {shim} requires {', '.join(unmet)}: "
                      f"pip install 'tensorboard-plugin-profile=={xprof}' (or the xprof its version pins)")
        else:
            r.ok(f"tensorboard-plugin-profile {shim} pins {', '.join(pins) or 'xprof'}; xprof {xprof} installed: agree")
    else:
        r.ok(f"xprof {xprof} (the profile plugin; the tensorboard-plugin-profile shim is not installed, which is fine)")
    for dist in ("tensorboard", "xprof"):
        unmet = _unmet_requirements(dist)
        if unmet:
            r.problem(f"{dist} requires {', '.join(unmet)}: pip install -U {dist}")
    r.note(f"tensorboard {tb} with plugin {xprof}: the plugin is versioned apart from TensorBoard and pins no "
           f"TensorBoard version, so differing numbers are expected")
    eps = [ep for ep in metadata.entry_points(group="tensorboard_plugins") if ep.name == "profile"]
    if not eps:
        r.problem("no 'profile' TensorBoard plugin is registered: reinstall: pip install --force-reinstall xprof")
        return None
    if len(eps) > 1:
        owners = ", ".join(f"{ep.dist.name if ep.dist else '?'} ({ep.value})" for ep in eps)
        r.problem(f"{len(eps)} 'profile' plugins registered: {owners}; TensorBoard loads one of them: "
                  f"pip uninstall tensorboard-plugin-profile xprof, then pip install tensorboard-plugin-profile")
    ep = eps[0]
    try:
        loader = ep.load()()
        plugin = loader.load(_context(None))
    except Exception as e:   # any failure here is what would hide the Profile tab
        r.problem(f"the profile plugin ({ep.value}) fails to load: {type(e).__name__}: {str(e)[:200]}")
        return None
    if plugin is None:
        r.problem("the profile plugin refused to load (TensorFlow's profiler_client and xprof's converter "
                  "both failed to import): reinstall tensorflow and xprof")
        return None
    r.ok(f"the 'profile' plugin ({ep.value}) loads into TensorBoard with TensorFlow's profiler")
    on_path = shutil.which("tensorboard")
    here = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    if on_path is None:
        r.note(f"no `tensorboard` on PATH: activate this environment, or run {sys.executable} -m tensorboard.main")
    elif os.path.realpath(os.path.dirname(on_path)) != os.path.realpath(os.path.dirname(here)):
        r.note(f"the `tensorboard` on PATH ({on_path}) is not this environment's; it may lack the plugin "
               f"(a common cause of a missing Profile tab): use {here}")
    return type(plugin)


def _context(logdir: str | None):
    """The few TBContext fields the profile plugin reads."""
    flags = types.SimpleNamespace(master_tpu_unsecure_channel="", logdir=logdir or "")
    return types.SimpleNamespace(logdir=logdir, data_provider=None, flags=flags, multiplexer=None)


def _has_events(folder: str) -> bool:
    return os.path.isdir(folder) and any(".tfevents." in f for f in os.listdir(folder))


def find_runs(logdir: str) -> list[str]:
    """Run directories under logdir (relative to it; '.' for itself): their own train/ and validation/
    TensorBoard runs count as part of them, not as runs of their own."""
    runs = []
    for folder, dirs, files in os.walk(logdir):
        has_events = any(".tfevents." in f for f in files) or any(
            _has_events(os.path.join(folder, d)) for d in SCALAR_RUNS)
        has_profile = os.path.isdir(os.path.join(folder, "plugins", "profile"))
        if has_events or has_profile or "summary.json" in files:
            runs.append(os.path.relpath(folder, logdir))
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not (has_events and d in SCALAR_RUNS))
    return runs


def scalar_runs(run_dir: str) -> dict[str, tuple[int, dict[str, int]]]:
    """{TensorBoard run ('train', 'validation', or '.' for event files in run_dir itself): scalar_points}."""
    return {name: scalar_points(os.path.join(run_dir, name)) for name in (".", *SCALAR_RUNS)
            if _has_events(os.path.join(run_dir, name))}


def scalar_points(folder: str) -> tuple[int, dict[str, int]]:
    """(event files, {scalar tag: points}) in one folder, read with TensorBoard's own event loader."""
    from tensorboard.backend.event_processing import event_file_loader
    files = sorted(f for f in os.listdir(folder) if ".tfevents." in f)
    points: dict[str, int] = {}
    for name in files:
        for event in event_file_loader.EventFileLoader(os.path.join(folder, name)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars" or value.HasField("simple_value"):
                    points[value.tag] = points.get(value.tag, 0) + 1
    return len(files), points


FIGURE_TOOLS = ("overview_page", "input_pipeline_analyzer", "framework_op_stats")


def read_trace(xplanes: list[str]) -> tuple[list[str], dict]:
    """The Profile tab's tools for these trace files, and the figures its own converter serves for them (what
    TensorBoard would show); ([], {}) if unreadable. The converter writes HLO and cache files next to the
    traces it reads, so it reads copies: the doctor only looks."""
    try:
        from xprof.convert import raw_to_tool_data
        with tempfile.TemporaryDirectory(prefix="fastcore-doctor-") as scratch:
            copies = [shutil.copy(x, scratch) for x in xplanes]
            tools = [t for t in raw_to_tool_data.xspace_to_tool_names(copies) if t]
            served = {tool: raw_to_tool_data.xspace_to_tool_data(copies, tool, {})[0]
                      for tool in FIGURE_TOOLS if tool in tools}
    except Exception:
        return [], {}
    return tools, served_figures(served)


def served_figures(served: dict) -> dict:
    """From the served tables (DataTable JSON): the Overview's average step time and the step markers it
    analysed, how many recommendations it gives, and the rows of the Input Op and Framework Op Stats tables."""
    out = {}
    for tool, data in served.items():
        try:
            tables = json.loads(data)
        except (TypeError, ValueError):
            continue
        for table in tables if isinstance(tables, list) else []:
            props, rows = table.get("p") or {}, len(table.get("rows") or [])
            cols = [c.get("id") for c in table.get("cols") or []]
            if tool == "overview_page" and "steptime_ms_average" in props:
                out.update(step_ms=float(props["steptime_ms_average"]), markers=rows)
            elif tool == "overview_page" and "tip_type" in cols:
                out["recommendations"] = rows
            elif tool == "input_pipeline_analyzer" and "opName" in cols:
                out["input_ops"] = rows
            elif tool == "framework_op_stats":   # the same table with and without idle time
                out["op_rows"] = max(out.get("op_rows", 0), rows)
    return out


def profile_notes(tools: list[str], figures: dict, recorded: dict) -> list[str]:
    """How to read the trace's step time, and exactly what of it the Profile tab shows without internet
    (checked in headless Chromium with no network: the page draws every chart and table with a chart script
    it fetches from the internet; its numbers, text and the Trace Viewer need nothing from outside)."""
    notes = []
    k = recorded.get("steps_per_call")
    if "step_ms" in figures and recorded.get("calls") and k:
        steady = (f"; the run's untraced steady step: {recorded['steady_step_ms']:.3f} ms"
                  if recorded.get("steady_step_ms") else "")
        notes.append(f"the Profile tab's Average Step Time, {figures['step_ms']:.1f} ms, is one compiled call of {k} "
                     f"step{'s' if k > 1 else ''} (one step marker per call): {figures['step_ms'] / k:.3f} ms per "
                     f"optimizer step{steady}")
    works, blank = [], []
    if any(t.startswith("trace_viewer") for t in tools):
        works.append("the Trace Viewer")
    if "step_ms" in figures:
        works.append(f"the Overview's Performance Summary (Average Step Time {figures['step_ms']:.1f} ms over "
                     f"{figures['markers']} step markers) and Run Environment")
        blank.append(f"the Overview's Step-time Graph and its {figures.get('recommendations', 0)} recommendations")
    if "input_ops" in figures:
        works.append("the Input Pipeline's verdict and step-time statistics")
        blank.append(f"the Input Pipeline's charts and Input Op table ({figures['input_ops']} rows)")
    if "op_rows" in figures:
        blank.append(f"Framework Op Stats' charts and table ({figures['op_rows']} rows)")
    if "memory_profile" in tools:
        works.append("the Memory Profile's summary")
        blank.append("the Memory Profile's timeline")
    blank += [f"the {name} charts" for tool, name in (("roofline_model", "Roofline"), ("memory_viewer", "Memory Viewer"))
              if tool in tools]
    if works:
        notes.append(f"offline, this trace shows: {'; '.join(works)}")
    if blank:
        notes.append(f"offline blank (drawn by a chart script the page fetches from the internet): {'; '.join(blank)}")
    return notes


def check_run(r: Report, logdir: str, name: str, plugin_runs: list[str] | None) -> bool:
    """Report one run; returns whether it holds a viewable profile trace."""
    run_dir = os.path.normpath(os.path.join(logdir, name))
    r.head(f"run {name}")
    found = scalar_runs(run_dir)
    n_files = sum(files for files, _ in found.values())
    for sub, (files, points) in found.items():
        where = "" if sub == "." else f"{sub}/: "
        if points:
            tags = ", ".join(f"{t} ({n})" for t, n in sorted(points.items()))
            r.ok(f"scalars: {where}{len(points)} tags in {files} event file(s): {tags}")
        if files > 1:
            r.note(f"{where}{files} event files: a resumed run, or a reused --run-name (TensorBoard draws them as "
                   f"one run; delete the run folder or pick a new --run-name to start clean)")
    if {"train", "validation"} <= set(found):
        shared = sorted(set(found["train"][1]) & set(found["validation"][1]))
        r.ok(f"train/ and validation/ share {len(shared)} tag(s) ({', '.join(shared)}): TensorBoard draws "
             f"each pair on one chart")
    if "." in found:
        r.note("event files in the run folder itself (written before runs had train/ and validation/): its "
               "train and eval figures are separate tags there")
    if not any(points for _, points in found.values()):
        r.note(f"{n_files} event file(s) but no scalars yet (a run still starting, or one that crashed before its "
               f"first call)" if n_files else
               "no scalars (no event files): a run from before TensorBoard support, or not started yet")
    summary_path = os.path.join(run_dir, "summary.json")
    summary = atomic.read_json_object(summary_path, "the run's summary", "delete it, or train again") \
        if os.path.exists(summary_path) else {}
    profile_root = os.path.join(run_dir, "plugins", "profile")
    viewable = False
    if os.path.isdir(profile_root):
        stray = [f for f in os.listdir(profile_root) if f.endswith(".xplane.pb")]
        if stray:
            r.problem(f"{', '.join(stray)} sit(s) directly in {profile_root}: the plugin reads only "
                      f"plugins/profile/<session>/*.xplane.pb: move them into a subfolder")
        sessions = sorted(d for d in os.listdir(profile_root) if os.path.isdir(os.path.join(profile_root, d)))
        if not sessions:
            r.problem(f"{profile_root} holds no session folder: the trace was never written "
                      f"(the run stopped before the profiler did)")
        for session in sessions:
            folder = os.path.join(profile_root, session)
            xplanes = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".xplane.pb"))
            label = f"{name}/{session}" if name != "." else session
            if not xplanes:
                r.problem(f"profile {label}: no .xplane.pb in it: the profiler was started but never stopped "
                          f"(the run crashed or was killed inside the --profile-steps window); train again")
                continue
            empty = [x for x in xplanes if os.path.getsize(x) == 0]
            if empty:
                r.problem(f"profile {label}: {len(empty)} empty trace file(s): the run was killed while saving")
                continue
            tools, figures = read_trace(xplanes)
            if not tools:
                r.problem(f"profile {label}: the installed plugin cannot read {os.path.basename(xplanes[0])} "
                          f"(corrupt, or written by a much newer profiler): upgrade xprof or train again")
                continue
            if plugin_runs is not None and label not in plugin_runs:
                r.problem(f"profile {label}: on disk but the plugin does not list it (is LOGDIR the folder "
                          f"TensorBoard is started with?)")
                continue
            size = sum(os.path.getsize(x) for x in xplanes)
            hosts = ", ".join(os.path.basename(x)[:-len(".xplane.pb")] for x in xplanes)
            recorded = summary.get("profile") or {}
            if not (recorded.get("dir") or "").endswith(session):
                recorded = {}
            steps, calls = recorded.get("steps"), recorded.get("calls")
            r.ok(f"profile {label}: host {hosts}, {size / 1e6:.1f} MB"
                 + (f", steps {steps[0]}-{steps[1]}" if steps else "")
                 + (f" in {calls} call{'s' if calls > 1 else ''} of {recorded['steps_per_call']}" if calls else "")
                 + f"; tools: {', '.join(tools[:6])}{', ...' if len(tools) > 6 else ''}")
            for line in profile_notes(tools, figures, recorded):
                r.note(line)
            viewable = True
    requested = summary.get("profile")
    if requested and not requested.get("dir"):
        a, b = requested.get("steps", ["?", "?"])
        r.problem(f"the run asked for --profile-steps {a}:{b} but wrote no trace: it stopped before step {a} "
                  f"(or resumed past it)")
    elif not os.path.isdir(profile_root):
        r.note("no profile trace: train with --profile-steps A:B to capture one")
    return viewable


def doctor(logdir: str, out=sys.stdout) -> int:
    if not os.path.exists(logdir):
        print(f"fastcore-profile: error: LOGDIR {logdir!r} does not exist: pass the --logdir your runs used "
              f"(default: profiles)", file=sys.stderr)
        return 2
    if not os.path.isdir(logdir):
        print(f"fastcore-profile: error: LOGDIR {logdir!r} is a file, not a folder", file=sys.stderr)
        return 2
    r = Report(out)
    plugin_class = check_install(r)
    plugin_runs = None
    if plugin_class is not None:
        try:   # exactly what the Profile tab will list for this logdir
            plugin_runs = list(plugin_class(_context(os.path.abspath(logdir))).runs_imp())
        except Exception as e:
            r.problem(f"the profile plugin cannot list runs in {logdir}: {type(e).__name__}: {str(e)[:200]}")
    runs = find_runs(logdir)
    r.head(f"logdir {logdir}: {len(runs)} run(s)")
    if not runs:
        r.problem(f"no runs under {logdir}: TensorBoard will show no scalars and 'No profile data was found'. "
                  f"Start it with the folder you passed to fastcore.train --logdir (runs are its subfolders)")
        parts = os.path.abspath(logdir).split(os.sep)
        if "plugins" in parts:
            r.note("this path is inside a run's plugins/ folder: pass the run's parent folder instead")
    with_trace = sum(check_run(r, logdir, name, plugin_runs) for name in runs)
    r.head("view")
    if runs and not with_trace:
        r.note("no run has a profile trace, so the Profile tab will say 'No profile data was found': "
               "train with --profile-steps A:B (e.g. 2:4)")
    r.note(f"tensorboard --logdir {shlex.quote(logdir)}   then open http://localhost:6006 : Scalars tab; "
           f"Profile tab (in the menu at the top right if not shown), runs named <run>/<session>")
    r.note("the Profile tab reads traces when you open it: after a new run, reload the page")
    r.note("offline, the Profile tab leaves blank what it draws with a chart script fetched from the internet (its "
           "charts and data tables); its numbers, its text and the Trace Viewer work: each trace above says which")
    r.head("healthy" if not r.problems else f"{r.problems} problem(s) found")
    return 0 if not r.problems else 1
