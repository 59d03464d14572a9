// Command vcsim runs govmomi's vCenter simulator (the `simulator` package from Debian's
// golang-github-vmware-govmomi-dev, which does not ship the upstream command) for Ferry's tests.
// It prints one JSON line with the SDK URL, the login and the TLS certificate's SHA-256, then
// serves until killed or until its standard input closes (so a dead parent never leaks it).
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"time"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net/url"
	"os"
	"strings"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	listen := flag.String("l", "127.0.0.1:0", "listen address")
	plain := flag.Bool("plain", false, "serve plain HTTP (behind a TLS front)")
	vms := flag.Int("vm", 2, "VMs per resource pool")
	hosts := flag.Int("host", 3, "hosts per cluster")
	clusters := flag.Int("cluster", 1, "clusters per datacenter")
	standalone := flag.Int("standalone-host", 1, "standalone hosts per datacenter")
	ds := flag.Int("ds", 1, "datastores")
	user := flag.String("username", "user", "login user")
	pass := flag.String("password", "pass", "login password")
	watchStdin := flag.Bool("stdin", true, "exit when standard input closes")
	flag.Parse()

	model := simulator.VPX()
	model.Machine = *vms
	model.ClusterHost = *hosts
	model.Cluster = *clusters
	model.Host = *standalone
	model.Datastore = *ds
	if err := model.Create(); err != nil {
		log.Fatalf("vcsim: creating the model: %v", err)
	}
	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*user, *pass)}
	if !*plain {
		// A fresh ECDSA certificate per run: the Go test certificate vcsim would use is shared by
		// every Go program and signed in ways modern TLS stacks refuse.
		cert, err := selfSigned()
		if err != nil {
			log.Fatalf("vcsim: certificate: %v", err)
		}
		model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	}
	server := model.Service.NewServer()

	out := map[string]string{
		"url":      strings.Replace(server.URL.String(), server.URL.User.String()+"@", "", 1),
		"username": *user,
		"password": *pass,
	}
	if !*plain {
		sum := sha256.Sum256(server.TLS.Certificates[0].Certificate[0])
		hex := make([]string, len(sum))
		for i, b := range sum {
			hex[i] = fmt.Sprintf("%02X", b)
		}
		out["tls_fingerprint"] = "sha256:" + strings.Join(hex, ":")
	}
	line, _ := json.Marshal(out)
	fmt.Println(string(line))

	if *watchStdin {
		io.Copy(io.Discard, os.Stdin)
		server.Close()
		model.Remove()
		return
	}
	select {}
}

func selfSigned() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "vcsim"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * 365 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, &tmpl, &tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}
