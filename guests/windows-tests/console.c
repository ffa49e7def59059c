/* Kiln Windows console test program.
 *
 * Prints a fixed greeting, its arguments, and a line from the Windows API so
 * a test can tell it really ran under Windows semantics (Wine), then exits
 * with the code given as "--exit N" (default 0). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <windows.h>

int main(int argc, char **argv)
{
    int code = 0;
    OSVERSIONINFOA ver;

    printf("Hello from the Kiln console test\n");
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--exit") == 0 && i + 1 < argc) {
            code = atoi(argv[++i]);
            continue;
        }
        printf("arg %d: %s\n", i, argv[i]);
    }
    ver.dwOSVersionInfoSize = sizeof(ver);
    if (GetVersionExA(&ver))
        printf("windows version: %lu.%lu\n", ver.dwMajorVersion, ver.dwMinorVersion);
    fprintf(stderr, "exiting with %d\n", code);
    fflush(stdout);
    return code;
}
