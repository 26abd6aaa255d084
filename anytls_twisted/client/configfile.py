"""One entry point for every client configuration file the command line (``--config``) and
the endpoint string (``anytls:...:config=FILE``) accept, told apart by their content:

* a JSON object whose outbounds have ``protocol`` keys: a v2ray-core-shaped outbound, every
  server of its ``settings.servers`` (:mod:`.v2ray`);
* any other JSON object: a sing-box ``anytls`` outbound, or a whole sing-box config whose first
  ``anytls`` outbound is used (:func:`.config.load_outbound`);
* otherwise text: ``anytls://`` URIs, one per line; blank lines and lines starting with ``#``
  are skipped.
"""

from __future__ import annotations

import json
from typing import Any, List

from ..singbox import ConfigFileError
from .config import ClientConfig, load_outbound, parse_uri
from .v2ray import is_v2ray, load_v2ray

__all__ = ["load_file"]

#: A client config file larger than this is not a client config file.
MAX_FILE_SIZE = 1 << 20


def load_file(path: str, password_file: bool = False) -> List[ClientConfig]:
    """The servers ``path`` describes, in order (at least one). Raise :class:`ConfigFileError`
    with one line naming the file, and the field or line; never the password."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_FILE_SIZE + 1)
    except OSError as e:
        raise ConfigFileError(f"cannot read config file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigFileError(f"{path}: not UTF-8 text: {e.reason}") from None
    if len(text) > MAX_FILE_SIZE:
        raise ConfigFileError(f"{path}: larger than {MAX_FILE_SIZE} bytes")
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            document: Any = json.loads(text)
        except ValueError as e:
            raise ConfigFileError(f"{path}: not valid JSON: {e}") from None
        except RecursionError:  # json's C parser, on arrays or objects nested too deeply
            raise ConfigFileError(f"{path}: not valid JSON: nested too deeply") from None
        if is_v2ray(document):
            return load_v2ray(path, document, password_file)
        return [load_outbound(document, password_file, path=path)]
    configs = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            configs.append(parse_uri(line, password_file))
        except ConfigFileError as e:
            raise ConfigFileError(f"{path}: line {number}: {e}") from None
    if not configs:
        raise ConfigFileError(
            f"{path}: no servers (expected a sing-box or v2ray JSON outbound, or anytls:// URIs)"
        )
    return configs
