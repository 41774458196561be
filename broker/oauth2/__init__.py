"""The OAuth 2.1 machinery, on Authlib: one module per RFC or concern. No Flask globals here."""
