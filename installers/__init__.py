"""What puts the daemon under the OS service manager (`volunteer service ...`).

`render` fills the templates in `templates/` (a systemd user or system unit, a launchd
property list, a Task Scheduler task) for one `ServiceSpec`; `service` writes them where
each platform looks, enables and starts them with the platform's own tools, and undoes
all of it. Each service runs `volunteer start --foreground` on the same home (and so the
same settings file) as the command that installed it.

Imports only the core modules and `volunteer.machine.atomic`: no torch, no network.
"""
