"""Apply a (re-read) list of configured exports to a live registry: the SIGHUP reload.

Theory of operation
-------------------
The daemon remembers which export names came from its configuration (``managed``);
exports created over the control socket are not touched by a reload. Given the new
wanted list, :func:`apply_exports`:

- adds exports that are new, but not one with a persist file (it is restored at start);
- removes managed exports no longer wanted, if no client is connected; busy ones are
  kept (and stay managed, so a later reload retries) with a log line, and so are exports
  with a persist file (``zramd destroy`` writes their snapshot);
- for exports that exist in both, applies what can change live (mem-limit,
  compression algorithm for new pages, recompression algorithms, the background policy's
  recompress-after / -interval / type, which restarts the policy, the pressure writeback's
  watermarks and wait) and logs, without touching
  data, changes that cannot (size, read-only, description, groups, persist, backing): they need
  ``destroy`` + reload.

It never discards the data of an export still wanted. It returns the log lines it
emitted, which the control ``reload`` operation passes back to the caller.
"""

from __future__ import annotations

import logging
from typing import Any

from zramd.config import ConfigError, ExportConfig
from zramd.device.interface import Unsupported

log = logging.getLogger("zramd.reload")


def apply_exports(
    registry: Any, wanted: list[ExportConfig], managed: set[str]
) -> tuple[set[str], list[str]]:
    """Make ``registry`` match ``wanted``; returns (new managed set, log lines)."""
    lines: list[str] = []

    def say(msg: str, level: int = logging.INFO) -> None:
        log.log(level, "%s", msg)
        lines.append(msg)

    wanted_names = {c.name for c in wanted}
    new_managed: set[str] = set()
    for name in sorted(managed - wanted_names):
        exp = registry.get(name) if name else None
        if exp is None:
            continue
        if exp.clients:
            say(
                f"export {name} removed from the configuration but kept: "
                f"{exp.clients} client(s) connected",
                logging.WARNING,
            )
            new_managed.add(name)
            continue
        if exp.config.persist is not None:
            say(
                f"export {name} removed from the configuration but kept: it persists to "
                f"{exp.config.persist} (zramd destroy {name} writes its snapshot and removes it)",
                logging.WARNING,
            )
            new_managed.add(name)
            continue
        registry.remove(name)
        say(f"export {name} removed")
    for cfg in wanted:
        exp = registry.get(cfg.name)
        if exp is None:
            if cfg.persist is not None:
                say(
                    f"export {cfg.name} not added: an export with a persist file is restored "
                    "when zramd starts (restart it)",
                    logging.ERROR,
                )
                continue
            try:
                registry.add(cfg)
            except ConfigError as e:
                say(f"export {cfg.name} not added: {e}", logging.ERROR)
                continue
            new_managed.add(cfg.name)
            say(f"export {cfg.summary()} added")
            continue
        new_managed.add(cfg.name)
        _update_live(exp, cfg, say)
    return new_managed, lines


def _update_live(exp: Any, cfg: ExportConfig, say: Any) -> None:
    old: ExportConfig = exp.config
    dev = exp.device
    if cfg.mem_limit != old.mem_limit:
        try:
            dev.set_mem_limit(cfg.mem_limit)
        except (Unsupported, ValueError) as e:
            say(f"export {cfg.name}: mem-limit not changed: {e}", logging.ERROR)
        else:
            old.mem_limit = cfg.mem_limit
            say(f"export {cfg.name}: mem-limit set to {cfg.mem_limit}")
    if (cfg.algorithm, cfg.level) != (old.algorithm, old.level):
        try:
            dev.set_algorithm(cfg.algorithm, level=cfg.level)
        except (Unsupported, ValueError) as e:
            say(f"export {cfg.name}: algorithm not changed: {e}", logging.ERROR)
        else:
            old.algorithm, old.level = cfg.algorithm, cfg.level
            say(f"export {cfg.name}: new pages compressed with {cfg.algorithm}")
    if cfg.recompression != old.recompression:
        try:
            dev.set_recompression(cfg.recompression)
        except (Unsupported, ValueError) as e:
            say(f"export {cfg.name}: recompression algorithms not changed: {e}", logging.ERROR)
        else:
            old.recompression = cfg.recompression
            names = " ".join(dev.recompression_algorithms) or "none"
            say(f"export {cfg.name}: recompression algorithms {names}")
    policy = ("recompress_after", "recompress_interval", "recompress_type")
    if any(getattr(cfg, k) != getattr(old, k) for k in policy):
        for k in policy:
            setattr(old, k, getattr(cfg, k))
        exp.set_policy(old)
        if old.recompress_after:
            say(
                f"export {cfg.name}: pages idle after {old.recompress_after:g}s recompressed "
                f"every {old.recompress_interval:g}s"
            )
        else:
            say(f"export {cfg.name}: background recompression off")
    writeback = ("writeback_high", "writeback_low", "writeback_wait")
    if any(getattr(cfg, k) != getattr(old, k) for k in writeback):
        try:
            dev.set_writeback_settings(cfg.writeback_high, cfg.writeback_low, cfg.writeback_wait)
        except (Unsupported, ValueError) as e:
            say(f"export {cfg.name}: writeback settings not changed: {e}", logging.ERROR)
        else:
            for k in writeback:
                setattr(old, k, getattr(cfg, k))
            say(
                f"export {cfg.name}: pressure writeback from {cfg.writeback_high:g} to "
                f"{cfg.writeback_low:g} of the limit, writes wait up to {cfg.writeback_wait:g}s"
            )
    fixed = [
        k
        for k in (
            "size", "read_only", "description", "group_pages", "group_algorithm", "persist",
            "sync", "backing",
        )
        if getattr(cfg, k) != getattr(old, k)
    ]
    if cfg.group_level != old.group_level and "group_algorithm" not in fixed:
        fixed.append("group_algorithm")
    if fixed:
        say(
            f"export {cfg.name}: {', '.join(k.replace('_', '-') for k in fixed)} changed in "
            "the configuration; kept as is (destroy the export and reload to apply)",
            logging.WARNING,
        )
