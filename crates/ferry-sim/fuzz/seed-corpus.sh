#!/bin/sh
# Seeds the xmlrpc fuzz corpus with requests the Python SDK sends.
set -eu
d="$(dirname "$0")/corpus/xmlrpc"
mkdir -p "$d"
printf "<?xml version='1.0'?>\n<methodCall>\n<methodName>session.login_with_password</methodName>\n<params>\n<param>\n<value><string>root</string></value>\n</param>\n<param>\n<value><string>pw</string></value>\n</param>\n</params>\n</methodCall>\n" > "$d/login"
printf "<methodCall><methodName>VM.create</methodName><params><param><value>OpaqueRef:1</value></param><param><value><struct><member><name>VCPUs_max</name><value><int>2</int></value></member><member><name>tags</name><value><array><data><value>a&amp;b</value></data></array></value></member></struct></value></param></params></methodCall>" > "$d/create"
printf "<value>OpaqueRef:abc</value>" > "$d/task-result"
