"""chatterd's resident tools: tools the model may call that chatterd runs itself (/llmtools).

`registry.py` holds the registry and the argument validator; each tool is one module with
its JSON schema and an async function (`weather.py`: get_weather, backed by Open-Meteo).
`resident()` is the one place that knows every tool, so neither module imports the other's
package peers.
"""

from settings import Settings
from tools import weather
from tools.registry import Registry


def resident(config: Settings) -> Registry:
    """The registry this process offers: each tool whose setting turns it on, none when
    --tool-rounds is 0."""
    offered = []
    if config.weather_url and config.tool_rounds > 0:
        offered.append(weather.tool(config.weather_url, config.tool_timeout))
    return Registry(offered, timeout=config.tool_timeout)
