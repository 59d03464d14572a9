"""pywinrm's `transport='kerberos'` (the vendor client: MIT's GSSAPI through pykerberos, with
requests-kerberos's mutual authentication) against the Hyper-V simulator as the Kerberos acceptor.
Runs a command in the WinRS shell and prints one JSON line. The caller sets KRB5_CONFIG and a
KRB5CCNAME holding the user's TGT (kinit).

usage: kerberos_probe.py URL USER MESSAGE_ENCRYPTION
"""

import json
import sys

import winrm

url, user, encryption = sys.argv[1:4]
s = winrm.Session(url, auth=(user, None), transport="kerberos", server_cert_validation="ignore",
                  message_encryption=encryption, kerberos_hostname_override="127.0.0.1")
r = s.run_cmd("echo", ["kerberos", "from", "pywinrm"])
print(json.dumps({"status": r.status_code, "stdout": r.std_out.decode().strip()}))
