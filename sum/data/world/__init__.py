"""The procedural image world: composite objects made of parts on cluttered backgrounds, with exact
ground truth for salient objects, entities and parts (spec §3, §10.1). The public entry points are
in `sum.data.synthetic`."""

from sum.data.world.materials import STYLES, Style, get_style
from sum.data.world.scene import Scene, categories, render_scene

__all__ = ["STYLES", "Scene", "Style", "categories", "get_style", "render_scene"]
