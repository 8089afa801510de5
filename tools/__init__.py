"""chatterd's resident tools: tools the model may call that chatterd runs itself (/llmtools).

`registry.py` holds the registry and the argument validator; each tool is one module with
its JSON schema and an async function (`weather.py`: get_weather, backed by Open-Meteo).
`resident()` is the one place that knows every tool, so neither module imports the other's
package peers.
"""

from tools import weather
from tools.registry import Registry


def resident(*, weather_url: str = "", timeout: float = 10.0) -> Registry:
    """The registry this process offers: each tool whose setting turns it on."""
    offered = []
    if weather_url:
        offered.append(weather.tool(weather_url, timeout))
    return Registry(offered, timeout=timeout)
