"""The user's side of the local identity provider's device code flow (``/devicelogin``).

A person opens the page and types the code a terminal showed; a test or a demo posts the same
form over HTTP (``user_code`` and ``username``), which is how they play the user.
"""

from __future__ import annotations

from html import escape

from devtools.server import Reply, Request, html_reply

_FORM = """<!doctype html><html><body><h1>Sign in a device</h1>
<form method="post" action="/devicelogin">
<label>Code <input name="user_code" autofocus></label>
<label>Account <input name="username" placeholder="user@contoso.com"></label>
<button type="submit">Sign in</button></form></body></html>"""


class DevicePages:
    """Mixin serving ``/devicelogin`` for a service that can approve device codes."""

    def approve_device_code(self, user_code: str, username: str) -> bool:
        """Approve ``user_code`` for ``username``; True when the code was pending."""
        raise NotImplementedError

    def device_login_page(self, request: Request) -> Reply:
        """GET shows the form; POST approves the code for the account."""
        if request.method != "POST":
            return html_reply(200, _FORM)
        form = request.form()
        user_code, username = form.get("user_code", ""), form.get("username", "")
        if not username or not self.approve_device_code(user_code, username):
            return html_reply(400, "<html><body>Unknown or expired code.</body></html>")
        page = f"<html><body>Signed in as {escape(username)}. Close this window.</body></html>"
        return html_reply(200, page)
