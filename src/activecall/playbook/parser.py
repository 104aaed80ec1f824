"""Playbook files: YAML front matter + Markdown ``# Scene:`` sections -> frozen dataclasses.

A playbook is parsed once, before a call needs it, so every mistake a user can make in it is found here
and reported as one ``PlaybookError`` naming the file, the line and the key.  Runtime ``{{ var }}``
templates are left in place (``activecall.playbook.templates`` renders them per call); only ``${VAR}``
environment references in the front matter are expanded here.  The front matter's sections, their
spellings and checks are ``playbook/front_matter.py``; this module splits the file, reads the YAML and
the scenes.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional

import yaml

# the front matter's names, re-exported: this module is where callers have always found them
from activecall.playbook.front_matter import (  # noqa: F401
    AUTO_PROVIDER, DEFAULT_BASE_URL, DEFAULT_FALLBACK, DEFAULT_MODEL, DTMF_ACTIONS, DTMF_DIGITS, ECHO_PROVIDER,
    ENV_REF, FEATURES, INTERRUPTION_STRATEGIES, RECORDER_FORMATS, AmbianceConfig, AsrConfig, CollectorConfig,
    Context, DtmfAction, EouConfig, FollowUpConfig, FrontMatter, InterruptionConfig, LlmConfig, PlaybookError,
    PosthookConfig, RealtimeConfig, RecorderConfig, SipConfig, TtsConfig, ValidationConfig, VadConfig,
    _frozen_map, apply_llm_defaults, dtmf_action,
)

DEFAULT_SCENE = "default"

_SCENE_HEADER = re.compile(r"^#\s*Scene:\s*(.*?)\s*$")
_SCENE_TAG = re.compile(r"<\s*(dtmf|play|followup)\b((?:[^>\"']|\"[^\"]*\"|'[^']*')*?)/?\s*>", re.IGNORECASE)
_ATTRIBUTE = re.compile(r"([A-Za-z_][\w-]*)\s*=\s*(?:\"([^\"]*)\"|'([^']*)')")


@dataclass(frozen=True)
class Scene:
    """One ``# Scene:`` section.  ``prompt`` is the preamble plus the scene text, tags removed, templates raw."""

    id: str
    prompt: str
    line: int
    dtmf: Mapping[str, DtmfAction] = field(default_factory=_frozen_map)
    play: Optional[str] = None
    followup: Optional[FollowUpConfig] = None


@dataclass(frozen=True)
class Playbook:
    source: str
    config: FrontMatter
    preamble: str
    scenes: Mapping[str, Scene]
    initial_scene: str
    warnings: tuple[str, ...] = ()

    @property
    def greeting(self) -> Optional[str]:
        """The static opener: top-level ``greeting`` wins over ``llm.greeting``."""
        if self.config.greeting is not None:
            return self.config.greeting
        return self.config.llm.greeting if self.config.llm else None

    @property
    def initial(self) -> Scene:
        return self.scenes[self.initial_scene]

    def dtmf_action(self, scene_id: str, digit: str) -> Optional[DtmfAction]:
        """The scene's action for ``digit`` first, then the global one."""
        scene = self.scenes.get(scene_id)
        if scene is not None and digit in scene.dtmf:
            return scene.dtmf[digit]
        return self.config.dtmf.get(digit)

    def followup_for(self, scene_id: str) -> Optional[FollowUpConfig]:
        """The scene's ``<followup>`` first, then the front matter's ``followUp``."""
        scene = self.scenes.get(scene_id)
        if scene is not None and scene.followup is not None:
            return scene.followup
        return self.config.follow_up



# -- front matter, environment, lines ------------------------------------------------------------------


def expand_env(text: str, environ: Mapping[str, str]) -> str:
    """Replace ``${NAME}`` with the environment's value; an unset name is left as written."""
    return ENV_REF.sub(lambda m: environ.get(m.group(1), m.group(0)), text)


def _key_lines(node, first_line: int, prefix: str = "", out: Optional[dict] = None) -> dict[str, int]:
    """Each key path of the composed YAML -> its 1-based line in the file."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = str(key_node.value)
            path = f"{prefix}.{key}" if prefix else key
            out[path] = key_node.start_mark.line + first_line
            _key_lines(value_node, first_line, path, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = f"{prefix}[{i}]"
            out[path] = item.start_mark.line + first_line
            _key_lines(item, first_line, path, out)
    return out


def split_front_matter(text: str, source: str = "<playbook>") -> tuple[str, str, int]:
    """(YAML text, body, line number of the body's first line).  The file must open with ``---``."""
    lines = text.lstrip("\ufeff").split("\n")
    if not lines or lines[0].strip() != "---":
        raise PlaybookError("a playbook must start with a '---' line (YAML front matter)", source, 1)
    for i in range(1, len(lines)):
        if lines[i].rstrip() in ("---", "..."):
            return "\n".join(lines[1:i]), "\n".join(lines[i + 1 :]), i + 2
    raise PlaybookError("the front matter is not closed by a '---' line", source, 1)


# -- scenes --------------------------------------------------------------------------------------------


def parse_attributes(text: str) -> dict[str, str]:
    """``a="1" b='2'`` -> {'a': '1', 'b': '2'}, in any order, either quote."""
    return {m.group(1): m.group(2) if m.group(2) is not None else m.group(3) for m in _ATTRIBUTE.finditer(text)}


@dataclass
class _SceneTags:
    dtmf: dict[str, DtmfAction] = field(default_factory=dict)
    play: Optional[str] = None
    followup: Optional[FollowUpConfig] = None


def _extract_scene_tags(text: str, first_line: int, scene: str, ctx: Context) -> tuple[str, _SceneTags]:
    """Remove ``<dtmf>``, ``<play>`` and ``<followup>`` from a scene's text and read them."""
    tags = _SceneTags()

    def take(m: re.Match) -> str:
        line = first_line + text.count("\n", 0, m.start())
        name, attrs = m.group(1).lower(), parse_attributes(m.group(2))
        where = f"scene '{scene}' <{name}>"
        try:
            if name == "dtmf":
                if "digit" not in attrs:
                    raise ValueError("needs a 'digit'")
                tags.dtmf[attrs["digit"]] = dtmf_action(attrs["digit"], attrs, where, ctx)
            elif name == "play":
                if not attrs.get("file"):
                    raise ValueError("needs a 'file'")
                if tags.play is None:
                    tags.play = attrs["file"]
                else:
                    ctx.warn(where, "only the first <play> of a scene is played")
            else:
                maximum = attrs.get("max", attrs.get("maxCount"))
                if "timeout" not in attrs or maximum is None:
                    raise ValueError("needs 'timeout' (ms) and 'max'")
                tags.followup = FollowUpConfig(int(attrs["timeout"]), int(maximum))
        except PlaybookError as e:
            raise PlaybookError(e.reason, ctx.source, line, where) from None
        except ValueError as e:
            reason = str(e) if "needs" in str(e) else f"timeout and max must be integers ({e})"
            raise PlaybookError(reason, ctx.source, line, where) from None
        return ""

    stripped = _SCENE_TAG.sub(take, text)
    return _tidy(stripped), tags


def _tidy(text: str) -> str:
    """Trim, and drop the blank lines a removed tag leaves behind."""
    return re.sub(r"\n[ \t]*\n(?:[ \t]*\n)+", "\n\n", text).strip()


def _split_scenes(body: str, body_line: int) -> tuple[tuple[str, int], list[tuple[str, int, str, int]]]:
    """(preamble, its line), [(scene id, header line, text, text's first line)]."""
    preamble: list[str] = []
    scenes: list[tuple[str, int, list[str]]] = []
    for offset, line in enumerate(body.split("\n")):
        m = _SCENE_HEADER.match(line)
        if m:
            scenes.append((m.group(1), body_line + offset, []))
        elif scenes:
            scenes[-1][2].append(line)
        else:
            preamble.append(line)
    return ("\n".join(preamble), body_line), [(sid, ln, "\n".join(text), ln + 1) for sid, ln, text in scenes]


# -- entry points ----------------------------------------------------------------------------------------


def parse_playbook(text: str, source: str = "<playbook>", environ: Optional[Mapping[str, str]] = None) -> Playbook:
    """Parse playbook ``text``; ``source`` names it in errors, ``environ`` (default os.environ) feeds ``${VAR}``."""
    environ = os.environ if environ is None else environ
    yaml_text, body, body_line = split_front_matter(text, source)
    expanded = expand_env(yaml_text, environ)
    try:
        lines = _key_lines(yaml.compose(expanded, Loader=yaml.SafeLoader), 2)
        data = yaml.safe_load(expanded)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 2 if mark is not None else None
        raise PlaybookError(f"invalid YAML: {getattr(e, 'problem', None) or e}", source, line) from None
    ctx = Context(source, lines)
    config = ctx.load(FrontMatter, data)
    config = apply_llm_defaults(config, environ)

    (preamble_text, preamble_line), sections = _split_scenes(body.rstrip(), body_line)
    preamble, shared = _extract_scene_tags(preamble_text, preamble_line, "(preamble)", ctx)
    scenes: dict[str, Scene] = {}
    if not sections:
        only = preamble or (config.llm.prompt if config.llm and config.llm.prompt else "")
        scenes[DEFAULT_SCENE] = Scene(
            DEFAULT_SCENE, only, body_line, _frozen_map(shared.dtmf), shared.play, shared.followup
        )
        preamble = ""
    for scene_id, header_line, scene_text, text_line in sections:
        if not scene_id:
            raise PlaybookError("a '# Scene:' header needs a name", source, header_line)
        if scene_id in scenes:
            raise PlaybookError(
                f"scene '{scene_id}' is defined twice (first on line {scenes[scene_id].line})", source, header_line
            )
        own_text, tags = _extract_scene_tags(scene_text, text_line, scene_id, ctx)
        prompt = f"{preamble}\n\n{own_text}" if preamble and own_text else (preamble or own_text)
        scenes[scene_id] = Scene(
            scene_id,
            prompt,
            header_line,
            _frozen_map({**shared.dtmf, **tags.dtmf}),
            tags.play or shared.play,
            tags.followup or shared.followup,
        )
    initial = next(iter(scenes))
    _check_goto_targets(config, scenes, ctx)
    if config.llm is not None:
        config = dataclasses.replace(config, llm=dataclasses.replace(config.llm, prompt=scenes[initial].prompt or config.llm.prompt))
    return Playbook(source, config, preamble, _frozen_map(scenes), initial, tuple(ctx.warnings))


def load_playbook(path: str, environ: Optional[Mapping[str, str]] = None) -> Playbook:
    """Read and parse the playbook file at ``path``."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise PlaybookError(f"cannot read: {e}", path) from None
    return parse_playbook(text, path, environ)


def _check_goto_targets(config: FrontMatter, scenes: Mapping[str, Scene], ctx: Context) -> None:
    """A DTMF ``goto`` to a scene that does not exist would fail mid-call: refuse it now."""
    for digit, action in config.dtmf.items():
        if action.action == "goto" and action.scene not in scenes:
            raise ctx.error(f"dtmf.{digit}", f"scene '{action.scene}' does not exist (scenes: {', '.join(scenes)})")
    for scene in scenes.values():
        for digit, action in scene.dtmf.items():
            if action.action == "goto" and action.scene not in scenes:
                raise PlaybookError(
                    f"<dtmf digit=\"{digit}\"> goes to scene '{action.scene}', which does not exist",
                    ctx.source,
                    scene.line,
                    f"scene '{scene.id}' <dtmf>",
                )

