"""pywinrm's `transport='ntlm'` (the vendor client: requests_ntlm, which binds NTLM to the TLS
channel with the server certificate's `tls-server-end-point` hash over HTTPS) against the Hyper-V
simulator. Runs a command in the WinRS shell and prints one JSON line.

usage: cbt_probe.py URL USER PASSWORD
"""

import json
import sys

import winrm

url, user, password = sys.argv[1:4]
s = winrm.Session(url, auth=(user, password), transport="ntlm", server_cert_validation="ignore",
                  message_encryption="auto")
r = s.run_cmd("echo", ["bound", "from", "pywinrm"])
print(json.dumps({"status": r.status_code, "stdout": r.std_out.decode().strip()}))
