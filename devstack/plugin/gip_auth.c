/*
 * gip_auth: the rules AWS IoT Core enforces on a device connection, for the local stage's mosquitto brokers.
 *
 * mosquitto 2.0.11 cannot express them for certificate identities with its own options:
 * - client id = thing name: `clientid_prefixes` is one global prefix, `use_username_as_clientid` is not applied
 *   when the username comes from the certificate, and on a listener with `use_identity_as_username` the CONNECT
 *   handler skips every authentication check (src/handle_connect.c). So that option is off, this plugin's
 *   basic-auth check reads the certificate's CN itself, refuses a client id that is not the CN, and sets the
 *   CN as the username. mosquitto runs this check before it takes over a session with the same client id, so a
 *   foreign client id never disconnects the device that owns it.
 * - revocation of open sessions: the listener's `crlfile` refuses a revoked certificate at the TLS handshake,
 *   but a session opened before the revocation stays. On SIGHUP mosquitto re-reads the CRL and then re-runs the
 *   basic-auth check for every connected client (mosquitto_security_apply_default); this plugin re-reads the
 *   same CRL (`plugin_opt_crl_file`) on that reload and refuses a revoked serial, so exactly the sessions of
 *   revoked certificates are closed, and a device's session with a newer certificate stays.
 * - subscriptions: mosquitto's acl_file grants every SUBSCRIBE ("FIXME - implement ACL subscription strings"),
 *   so a forbidden filter got a grant that delivers nothing. Here a filter outside data/<thing>/ is denied,
 *   and mosquitto answers 0x80 (MQTT 3.1.1) or 0x87 (MQTT 5) in the SUBACK, as AWS IoT does.
 *
 * - "revoked" means refused when the operator's command returns: after loading a CRL (at start and on each reload)
 *   the plugin writes the CRL's number into `plugin_opt_loaded_file`, so the stack observes that a broker has the
 *   new list instead of assuming it. mosquitto runs the reload and then the re-check of every client in one pass
 *   of its (single-threaded) loop, so once the number is written no later packet is served without it.
 *
 * Options: plugin_opt_crl_file <PEM CRL of the region's CA> (required), plugin_opt_loaded_file <path> (optional:
 * where the number of the CRL loaded is written), plugin_opt_observer <CN> (optional: an identity that may read
 * data/#, with client ids <CN> or <CN>-<anything>; the stack's monitor).
 *
 * Built by devstack/stack.py (gcc, Debian's mosquitto-dev, libmosquitto-dev and libssl-dev headers).
 */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <openssl/bn.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define CN_MAX 256 /* thing names have at most 128 characters */
#define TOPIC_ROOT "data/"

static mosquitto_plugin_id_t *plugin_id;
static X509_CRL *crl;
static char observer[CN_MAX + 1];
static char *crl_path; /* kept: mosquitto 2.0.11 passes no options with MOSQ_EVT_RELOAD */
static char *loaded_path;

#define NUMBER_WIDTH 40 /* the CRL number in decimal, right-aligned: the record keeps one size */

/* Writes the loaded CRL's number over the previous one, in place and in one write of a fixed size: no new file
 * and no new block (it works on a full disk), and a reader sees the old number or the new one. */
static void report_loaded(X509_CRL *loaded)
{
	ASN1_INTEGER *number = X509_CRL_get_ext_d2i(loaded, NID_crl_number, NULL, NULL);
	BIGNUM *big = number ? ASN1_INTEGER_to_BN(number, NULL) : NULL;
	char *text = big ? BN_bn2dec(big) : NULL;
	char record[NUMBER_WIDTH + 2];
	int fd;

	snprintf(record, sizeof(record), "%*s\n", NUMBER_WIDTH, text ? text : "0");
	mosquitto_log_printf(MOSQ_LOG_INFO, "gip_auth: loaded CRL number %s", text ? text : "(none)");
	OPENSSL_free(text);
	BN_free(big);
	ASN1_INTEGER_free(number);
	if(!loaded_path) return;
	fd = open(loaded_path, O_WRONLY | O_CREAT, 0644);
	if(fd < 0 || pwrite(fd, record, strlen(record), 0) != (ssize_t)strlen(record)){
		mosquitto_log_printf(MOSQ_LOG_ERR, "gip_auth: cannot write %s", loaded_path);
	}
	if(fd >= 0) close(fd);
}

static const char *option(struct mosquitto_opt *options, int count, const char *key)
{
	for(int i = 0; i < count; i++){
		if(!strcmp(options[i].key, key)) return options[i].value;
	}
	return NULL;
}

/* Loads the CRL; keeps the one loaded before when the file cannot be read. */
static int load_crl(const char *path)
{
	FILE *file = fopen(path, "r");
	X509_CRL *fresh;

	if(!file){
		mosquitto_log_printf(MOSQ_LOG_ERR, "gip_auth: cannot open CRL %s", path);
		return MOSQ_ERR_INVAL;
	}
	fresh = PEM_read_X509_CRL(file, NULL, NULL, NULL);
	fclose(file);
	if(!fresh){
		mosquitto_log_printf(MOSQ_LOG_ERR, "gip_auth: %s is not a PEM CRL", path);
		return MOSQ_ERR_INVAL;
	}
	X509_CRL_free(crl);
	crl = fresh;
	report_loaded(crl);
	return MOSQ_ERR_SUCCESS;
}

/* The certificate's CN, whole and without an embedded NUL, or false. */
static bool common_name(X509 *cert, char *out)
{
	X509_NAME *name = X509_get_subject_name(cert);
	int index = name ? X509_NAME_get_index_by_NID(name, NID_commonName, -1) : -1;
	ASN1_STRING *data;
	int length;

	if(index < 0) return false;
	data = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, index));
	length = data ? ASN1_STRING_length(data) : 0;
	if(length <= 0 || length > CN_MAX) return false;
	memcpy(out, ASN1_STRING_get0_data(data), (size_t)length);
	out[length] = '\0';
	return strlen(out) == (size_t)length;
}

static bool revoked(X509 *cert)
{
	X509_REVOKED *entry;
	return crl && X509_CRL_get0_by_serial(crl, &entry, X509_get_serialNumber(cert)) == 1;
}

static bool is_observer(const char *cn)
{
	return observer[0] && !strcmp(cn, observer);
}

static bool client_id_allowed(const char *client_id, const char *cn)
{
	size_t length = strlen(cn);
	if(!client_id) return false;
	if(!strcmp(client_id, cn)) return true;
	return is_observer(cn) && !strncmp(client_id, cn, length) && client_id[length] == '-';
}

/* topic or filter is data/<thing> or below it. The CA puts only thing names (no + or #) in CNs. */
static bool under(const char *topic, const char *thing)
{
	size_t root = strlen(TOPIC_ROOT), length = strlen(thing);
	return !strncmp(topic, TOPIC_ROOT, root) && !strncmp(topic + root, thing, length)
		&& (topic[root + length] == '\0' || topic[root + length] == '/');
}

static int on_basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *ed = event_data;
	const char *client_id = mosquitto_client_id(ed->client);
	X509 *cert = mosquitto_client_certificate(ed->client);
	char cn[CN_MAX + 1];
	int rc = MOSQ_ERR_AUTH;

	(void)event;
	(void)userdata;
	if(!cert){
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "gip_auth: refused %s: no client certificate", client_id);
	}else if(!common_name(cert, cn)){
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "gip_auth: refused %s: certificate without a usable CN", client_id);
	}else if(revoked(cert)){
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "gip_auth: refused %s: certificate of %s is revoked", client_id, cn);
	}else if(!client_id_allowed(client_id, cn)){
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "gip_auth: refused client id %s: the certificate is %s's",
				client_id, cn);
	}else{
		rc = mosquitto_set_username(ed->client, cn);
	}
	X509_free(cert);
	return rc;
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	const char *user = mosquitto_client_username(ed->client);

	(void)event;
	(void)userdata;
	if(!user) return MOSQ_ERR_ACL_DENIED;
	if(ed->access == MOSQ_ACL_UNSUBSCRIBE) return MOSQ_ERR_SUCCESS;
	if(is_observer(user)){
		if(ed->access == MOSQ_ACL_WRITE) return MOSQ_ERR_ACL_DENIED;
		return strncmp(ed->topic, TOPIC_ROOT, strlen(TOPIC_ROOT)) ? MOSQ_ERR_ACL_DENIED : MOSQ_ERR_SUCCESS;
	}
	return under(ed->topic, user) ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
}

static int on_reload(int event, void *event_data, void *userdata)
{
	(void)event;
	(void)event_data;
	(void)userdata;
	/* The connected clients are checked again right after this, against the CRL loaded here. */
	load_crl(crl_path);
	return MOSQ_ERR_PLUGIN_DEFER;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
		struct mosquitto_opt *options, int option_count)
{
	const char *name = option(options, option_count, "observer");
	const char *path = option(options, option_count, "crl_file");
	const char *loaded = option(options, option_count, "loaded_file");
	int rc;

	(void)userdata;
	plugin_id = identifier;
	if(name && strlen(name) <= CN_MAX) strcpy(observer, name);
	if(!path){
		mosquitto_log_printf(MOSQ_LOG_ERR, "gip_auth: plugin_opt_crl_file is required");
		return MOSQ_ERR_INVAL;
	}
	crl_path = mosquitto_strdup(path);
	if(loaded && !(loaded_path = mosquitto_strdup(loaded))) return MOSQ_ERR_NOMEM;
	rc = crl_path ? load_crl(crl_path) : MOSQ_ERR_NOMEM;
	if(rc) return rc;
	if(mosquitto_callback_register(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, NULL)
			|| mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL)
			|| mosquitto_callback_register(plugin_id, MOSQ_EVT_RELOAD, on_reload, NULL, NULL)){
		return MOSQ_ERR_UNKNOWN;
	}
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	(void)options;
	(void)option_count;
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_RELOAD, on_reload, NULL);
	X509_CRL_free(crl);
	crl = NULL;
	mosquitto_free(crl_path);
	crl_path = NULL;
	mosquitto_free(loaded_path);
	loaded_path = NULL;
	return MOSQ_ERR_SUCCESS;
}
