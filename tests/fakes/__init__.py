"""Fakes of REST-shaped upstreams (GitHub, Atlassian, Salesforce) on ``pytest-httpserver``.

Each fake answers over real HTTP exactly as the documented API does, quirks included, so the
provider plugins are tested through their real HTTP code. A fake plays the upstream's browser
side too: its authorization endpoint signs in a configured user at once and redirects back with
a code, so a cookie-keeping HTTP client that follows redirects completes a login.
"""
