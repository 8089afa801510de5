"""get_weather(lat, lon): the current weather at a place, from Open-Meteo's forecast API.

The course's llmTools resident tool.  chatterd asks `{--weather-url}?latitude=..&longitude=..
&current=temperature_2m,wind_speed_10m,weather_code` with Tornado's AsyncHTTPClient and a
short timeout (--tool-timeout) and answers the model in one line of text; an HTTP error,
a timeout or an answer it cannot read is the result text too ("error: ...").
"""

from typing import Any
from urllib.parse import urlencode

from tornado.httpclient import AsyncHTTPClient, HTTPClientError

import jsonfmt
from tools.registry import Tool

SCHEMA = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather (temperature, wind, conditions) at a location "
                       "given by its latitude and longitude",
        "parameters": {
            "type": "object",
            "properties": {
                "lat": {"type": "number", "description": "latitude in degrees",
                        "minimum": -90, "maximum": 90},
                "lon": {"type": "number", "description": "longitude in degrees",
                        "minimum": -180, "maximum": 180},
            },
            "required": ["lat", "lon"],
        },
    },
}

CURRENT = ("temperature_2m", "wind_speed_10m", "weather_code")


def tool(url: str, timeout: float) -> Tool:
    async def get_weather(lat: float, lon: float, **_: Any) -> str:
        query = urlencode({"latitude": lat, "longitude": lon, "current": ",".join(CURRENT)})
        try:
            response = await AsyncHTTPClient().fetch(
                f"{url}{'&' if '?' in url else '?'}{query}", connect_timeout=timeout,
                request_timeout=timeout, follow_redirects=False)
        except HTTPClientError as e:
            reason = e.message
            if e.response is not None and e.response.body:
                try:
                    reason = jsonfmt.loads(e.response.body).get("reason") or reason
                except (ValueError, AttributeError):
                    pass
            return f"error: the weather service answered {e.code}: {reason}"
        except OSError as e:
            return f"error: the weather service is unreachable: {e}"
        try:
            answer = jsonfmt.loads(response.body)
            now, units = answer["current"], answer.get("current_units") or {}
            parts = [f"{name} {now[name]}{units.get(name, '')}" for name in CURRENT if name in now]
        except (ValueError, KeyError, TypeError, AttributeError):
            return "error: the weather service's answer could not be read"
        return f"Current weather at latitude {lat}, longitude {lon} ({now.get('time', 'now')}): " \
               + ", ".join(parts)

    return Tool(SCHEMA, get_weather)
