"""Authentication (OAuth2 bearer JWTs from OIDC issuers) and organization-based access control."""
