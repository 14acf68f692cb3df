"""pgqr: keeps Evolution API (WhatsApp) login QR codes fresh from PostgreSQL."""

__version__ = "0.1.0"
