"""chatterd's resident tools: tools the model may call that chatterd runs itself (/llmtools).

`registry.py` holds the registry and the argument validator; each tool is one module with
its JSON schema and an async function (`weather.py`: get_weather, backed by Open-Meteo).
"""
